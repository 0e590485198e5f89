"""What CompVis checkpoints share (LDM-4-G, Stable Diffusion 1.x): their yaml configs and LitEma names.

Configs are read with PyYAML's `safe_load` when it is installed (`pip install 'minidiff[convert]'`),
so any valid YAML works: flow style, anchors, quoted strings. Without it a small reader takes the
block-style subset the CompVis configs themselves use, and names the file and line of anything
outside that subset together with the install command.
"""
import functools
import re

EMA_PREFIX = "model_ema."


def ema_key(key: str) -> str:
    """LitEma's name for a model key: `model.a.b.0.weight` -> `model_ema.ab0weight`."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")



class YamlError(ValueError):
    """A config line this reader cannot take; the message names the file and line."""


class YamlSubsetError(YamlError):
    """A line the block-style fallback cannot take but PyYAML may (flow style over several lines,
    anchors, directives, multi-line strings): its message names the install command."""


INSTALL_HINT = "install PyYAML to read any YAML: pip install 'minidiff[convert]'"


_KEY = re.compile(r"""^("[^"]*"|'[^']*'|[^\s"'#\-\[{][^:]*?)\s*:(?:\s+(.*))?$""")
# Numbers as OmegaConf (which the CompVis code loads configs with) reads them: 1e-4 is a float too.
_NUMBER = re.compile(r"^[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def read_yaml(text: str, name: str = "config") -> dict:
    """The mapping of a YAML config: PyYAML's safe_load when installed, else the block-style reader."""
    try:
        import yaml
    except ImportError:
        try:
            return read_block_yaml(text, name)
        except YamlSubsetError as e:
            raise YamlSubsetError(f"{e}; {INSTALL_HINT}") from None
    try:
        loader = _safe_loader(yaml)(text)  # a SafeLoader: plain data only, no Python objects
        try:
            value = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        raise YamlError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise YamlError(f"{name}: the document is a {type(value).__name__}, expected a mapping (model: ...)")
    return value


@functools.lru_cache(maxsize=None)
def _safe_loader(yaml):
    """PyYAML's SafeLoader reading numbers as OmegaConf does (`1e-4` is a float, not a string) and
    refusing duplicate keys, which safe_load would silently let the last one win."""
    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden, not a duplicate
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                 list("-+0123456789."))
    return Loader


def read_block_yaml(text: str, name: str = "config") -> dict:
    """The mapping of a block-style YAML document (nested mappings, lists, scalars, comments):
    the reader used when PyYAML is not installed."""
    lines = []  # (indent, content, line number)
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        content = line.lstrip(" ")
        if not content or content in ("---", "..."):
            continue
        if content.startswith("%"):
            raise YamlSubsetError(f"{name}:{number}: YAML directives such as {content!r} are not read")
        if content.startswith("\t"):
            raise YamlError(f"{name}:{number}: tabs are not valid YAML indentation; indent with spaces")
        lines.append([len(line) - len(content), content, number])
    if not lines:
        return {}
    value, end = _block(lines, 0, lines[0][0], name)
    if end != len(lines):
        raise YamlSubsetError(f"{name}:{lines[end][2]}: unexpected indentation")
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
            raise YamlSubsetError(f"{name}:{lines[i][2]}: expected `key: value`, got {lines[i][1]!r}")
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
        raise YamlSubsetError(f"{name}:{lines[i][2]}: unexpected indentation")
    return mapping, i


def _scalar(text: str, name: str, number: int):
    text = text.strip()
    if text[0] in "&*!|>" or text.startswith("{") and text != "{}":
        raise YamlSubsetError(f"{name}:{number}: {text!r} uses YAML syntax this reader does not support (anchors, "
                              "tags, block strings, flow mappings)")
    if text == "{}":
        return {}
    if text.startswith("["):
        if not text.endswith("]") or "[" in text[1:]:
            raise YamlSubsetError(f"{name}:{number}: only one-line flat lists like [1, 2] are supported, got {text!r}")
        items = [item for item in text[1:-1].split(",")]
        if items and not items[-1].strip():  # [1, 2, ] has two items
            items.pop()
        if any(not item.strip() for item in items):
            raise YamlError(f"{name}:{number}: empty item in the list {text!r}")
        return [_scalar(item, name, number) for item in items]
    if text[0] in "\"'":
        if len(text) < 2 or text[-1] != text[0]:
            raise YamlSubsetError(f"{name}:{number}: unterminated string {text!r}")
        return text[1:-1]
    if text in ("null", "Null", "NULL", "~"):
        return None
    if text.lower() in _BOOLS:
        return _BOOLS[text.lower()]
    if _NUMBER.match(text):
        digits = text.replace("_", "")
        return int(digits) if re.fullmatch(r"[-+]?\d+", digits) else float(digits)
    return text
