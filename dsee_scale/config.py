"""Typed configs from plain dicts (YAML), with errors that name the key and the allowed values.

A config section is a dataclass. `from_dict(Cls, data, "dsee")` checks every key against the
dataclass fields (unknown keys are refused, with a close match suggested), converts and checks
types from the annotations (int, float, bool, str, Literal[...], list[str], Optional[...],
nested dataclasses), then calls the section's `validate()` for range checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError

UNIONS = (Union, types.UnionType)  # Optional[X] and X | None


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in UNIONS:
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp, key: str):
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in UNIONS:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own message is the useful one
            return _convert(value, real[0], key)
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: got {value!r}, allowed: {_type_name(tp)}")
    if origin is list:
        if isinstance(value, str):  # a single name is a one-element list
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
        (item,) = get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ConfigError(f"{key}: got the number {value!r}, expected a string; quote it in YAML "
                              "(YAML reads 2:4 as the base-60 number 124)")  # fmt: skip
    raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")


def from_dict(cls, data: dict | None, section: str):
    """Build dataclass `cls` from `data`; `section` prefixes key names in errors."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{section or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        name = f"{section}.{key}" if section else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{name}: unknown key{hint}; allowed keys: {', '.join(sorted(fields))}")
        kwargs[key] = _convert(value, hints[key], name)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(section)
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if re.fullmatch(r"\d+:\d+", raw.strip()):  # 2:4 is a pattern, not YAML 1.1's base-60 124
            value = raw.strip()
        node = data
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data
