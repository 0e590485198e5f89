"""Dataclass configs to and from plain JSON dicts, strictly: an unknown field is an error, not dropped."""
from dataclasses import asdict, fields


def config_to_dict(config) -> dict:
    """JSON-ready dict of a dataclass config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def config_from_dict(cls, data: dict):
    """`cls(**data)`, naming any field `cls` does not have instead of a bare TypeError."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} must be read from a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**data)
