"""Public checkpoint layouts as data: the key names and config fields of diffusers, CompVis/LDM and
pesser's DDPM port, mapped to minidiff's. The converters (minidiff.convert) read them in, export
writes them out, and LoRA files name layers by them."""
