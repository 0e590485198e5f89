"""Public formats in, native minidiff folders out: key tables, config readers, the CompVis YAML
reader, the named full-size architectures, and the three converters (ddpm, ldm, sd15), each with
its own `main()` (`python -m minidiff.convert.sd15 SRC DST`, or the scripts in the repository's convert/)."""
