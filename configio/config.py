"""Typed configuration: YAML files plus dotted `key=value` overrides, checked before any work starts.

Every job config is a tree of dataclasses. Unknown keys and values of the wrong type are rejected with a
message naming the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")
# Integers a setting may hold: what numpy's and torch's int64 take. Larger values are refused here rather than by an
# overflow deep inside a job.
INT_LIMIT = 2**63
# A number written the way people write it ("3e-4", "1_000", "+2.5E3"): YAML 1.1 reads some of these as strings.
_NUMBER = re.compile(r"[+-]?(\d(_?\d)*)?(\.\d*)?([eE][+-]?\d+)?")
_short = reprlib.Repr()
_short.maxlevel, _short.maxlist, _short.maxdict, _short.maxstring, _short.maxother = 2, 4, 4, 60, 60


def shown(value: Any) -> str:
    """A bounded repr for messages: a YAML alias bomb or a huge list never gets expanded into an error line."""
    return _short.repr(value)


def _number_from_text(value: Any) -> Any:
    if isinstance(value, str) and any(c.isdigit() for c in value) and _NUMBER.fullmatch(value.strip()):
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            return value
    return value


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be null")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if not isinstance(value, (str, int, float, bool, type(None))) or value not in allowed:
            raise ConfigError(f"{key}: {shown(value)} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {shown(value)}")
        (item_type, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {shown(value)}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
    if tp is int:
        value = _number_from_text(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= INT_LIMIT:
                raise ConfigError(f"{key}: {shown(value)} is too large (integer settings stop at 2**63)")
            return value
        raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
    if tp is float:
        value = _number_from_text(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= INT_LIMIT:
                raise ConfigError(f"{key}: {shown(value)} is too large for a number setting")
            value = float(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {shown(value)}")
            return value
        raise ConfigError(f"{key}: expected a number (such as 3e-4 or 0.001), got {shown(value)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {shown(value)}")
    raise ConfigError(f"{key}: unsupported setting type {tp!r}")


def _default_section(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return value if dataclasses.is_dataclass(value) else None
    return f.default if dataclasses.is_dataclass(f.default) else None


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def from_dict(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping, rejecting unknown keys and bad values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of settings, got {shown(values)}")
    unknown = sorted(map(str, set(values) - set(fields)))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {}
    for name, value in values.items():
        default = _default_section(fields[name]) if isinstance(value, dict) else None
        # A section given in part keeps the defaults its parent chose for the rest (a job may change them).
        kwargs[name] = _coerce(_merged(to_dict(default), value) if default is not None else value, hints[name], prefix + name)
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def incidental(default: Any) -> Any:
    """A dataclass field for a setting that changes how a job runs, not its result (a device, a batch size for
    scoring, how often it logs): recorded in a run folder, never compared by the run-folder rule."""
    return dataclasses.field(default=default, metadata={"incidental": True})


def incidental_settings(cls: type, prefix: str = "") -> tuple[str, ...]:
    """The dotted names of the settings of dataclass `cls` (and of its sections) declared with `incidental`."""
    hints = typing.get_type_hints(cls)
    names: list[str] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("incidental"):
            names.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            names += incidental_settings(hints[f.name], f"{prefix}{f.name}.")
    return tuple(names)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (for example train.max_steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return values


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass CONFIG=configs/<name>.yaml")
    try:
        values = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (a binary file?); pass a YAML config") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of settings at the top level")
    return values


def load_values(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw settings of an optional YAML file with dotted overrides applied (what the user wrote, unchecked)."""
    return apply_overrides(load_yaml(path) if path else {}, list(overrides or []))


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load `cls` from an optional YAML file, then apply dotted overrides; validate everything."""
    return from_dict(cls, load_values(path, overrides))
