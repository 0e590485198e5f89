"""What CompVis checkpoints share (LDM-4-G, Stable Diffusion 1.x): their yaml configs and LitEma names.

The yaml reader takes the block-style subset the CompVis configs use, so minidiff needs no YAML
package; it names the file and line of anything outside that subset.
"""
import re

EMA_PREFIX = "model_ema."


def ema_key(key: str) -> str:
    """LitEma's name for a model key: `model.a.b.0.weight` -> `model_ema.ab0weight`."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")



class YamlError(ValueError):
    """A config line this reader cannot take; the message names the file and line."""


_KEY = re.compile(r"""^("[^"]*"|'[^']*'|[^\s"'#\-\[{][^:]*?)\s*:(?:\s+(.*))?$""")
# Numbers as OmegaConf (which the CompVis code loads configs with) reads them: 1e-4 is a float too.
_NUMBER = re.compile(r"^[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def read_yaml(text: str, name: str = "config") -> dict:
    """The mapping of a block-style YAML document (nested mappings, lists, scalars, comments)."""
    lines = []  # (indent, content, line number)
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        content = line.lstrip(" ")
        if not content or content in ("---", "..."):
            continue
        if content.startswith("\t"):
            raise YamlError(f"{name}:{number}: tabs are not valid YAML indentation; indent with spaces")
        lines.append([len(line) - len(content), content, number])
    if not lines:
        return {}
    value, end = _block(lines, 0, lines[0][0], name)
    if end != len(lines):
        raise YamlError(f"{name}:{lines[end][2]}: unexpected indentation")
    if not isinstance(value, dict):
        raise YamlError(f"{name}: the document is a list, expected a mapping (model: ...)")
    return value


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _block(lines, i, indent, name):
    """The mapping or list whose entries start at column `indent` on line i; returns (value, next line)."""
    if lines[i][1] == "-" or lines[i][1].startswith("- "):
        items = []
        while i < len(lines) and lines[i][0] == indent and (lines[i][1] == "-" or lines[i][1].startswith("- ")):
            rest = lines[i][1][1:].lstrip(" ")
            if not rest:
                if i + 1 >= len(lines) or lines[i + 1][0] <= indent:
                    items.append(None)
                    i += 1
                    continue
                value, i = _block(lines, i + 1, lines[i + 1][0], name)
            elif _KEY.match(rest) or rest == "-" or rest.startswith("- "):
                # "- key: value" opens a mapping whose keys line up with `key` ("- - x": a nested list)
                lines[i] = [indent + len(lines[i][1]) - len(rest), rest, lines[i][2]]
                value, i = _block(lines, i, lines[i][0], name)
            else:
                value, i = _scalar(rest, name, lines[i][2]), i + 1
            items.append(value)
        return items, i
    mapping = {}
    while i < len(lines) and lines[i][0] == indent:
        match = _KEY.match(lines[i][1])
        if not match or lines[i][1].startswith("- "):
            raise YamlError(f"{name}:{lines[i][2]}: expected `key: value`, got {lines[i][1]!r}")
        key, rest = match.group(1).strip("\"'"), match.group(2)
        if key in mapping:
            raise YamlError(f"{name}:{lines[i][2]}: duplicate key {key!r}")
        if rest:
            mapping[key], i = _scalar(rest, name, lines[i][2]), i + 1
            continue
        i += 1
        nested = i < len(lines) and (lines[i][0] > indent or lines[i][0] == indent and lines[i][1].startswith("-"))
        mapping[key], i = _block(lines, i, lines[i][0], name) if nested else (None, i)
    if i < len(lines) and lines[i][0] > indent:
        raise YamlError(f"{name}:{lines[i][2]}: unexpected indentation")
    return mapping, i


def _scalar(text: str, name: str, number: int):
    text = text.strip()
    if text[0] in "&*!|>" or text.startswith("{") and text != "{}":
        raise YamlError(f"{name}:{number}: {text!r} uses YAML syntax this reader does not support (anchors, tags, "
                        "block strings, flow mappings); write it as plain block-style values")
    if text == "{}":
        return {}
    if text.startswith("["):
        if not text.endswith("]") or "[" in text[1:]:
            raise YamlError(f"{name}:{number}: only one-line flat lists like [1, 2] are supported, got {text!r}")
        items = [item for item in text[1:-1].split(",")]
        if items and not items[-1].strip():  # [1, 2, ] has two items
            items.pop()
        if any(not item.strip() for item in items):
            raise YamlError(f"{name}:{number}: empty item in the list {text!r}")
        return [_scalar(item, name, number) for item in items]
    if text[0] in "\"'":
        if len(text) < 2 or text[-1] != text[0]:
            raise YamlError(f"{name}:{number}: unterminated string {text!r}")
        return text[1:-1]
    if text in ("null", "Null", "NULL", "~"):
        return None
    if text.lower() in _BOOLS:
        return _BOOLS[text.lower()]
    if _NUMBER.match(text):
        digits = text.replace("_", "")
        return int(digits) if re.fullmatch(r"[-+]?\d+", digits) else float(digits)
    return text
