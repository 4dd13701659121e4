"""From text to the typed tree: config files, dotted command-line overrides, and a generic builder.

    load_file("run.yaml")                          -> {"engine": {"optim": {"lr": 2e-5}}, ...}
    apply_overrides(tree, ["--engine.optim.lr", "3e-5", "--engine.offload.speculate=false"])
    build(TrainConfig, tree)                       -> TrainConfig(engine=EngineConfig(...), ...)

``build`` works for any tree of dataclasses. It converts nothing silently: a string where a float
belongs, or a key the dataclass does not have, is a :class:`ConfigError` naming the full dotted key.
Range checks are not done here; each tree's ``validate`` does them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import pathlib
import re
import tomllib
import types
import typing
from typing import Any, Literal, Union

import yaml

from heavylift.config.errors import ConfigError, HeavyliftError


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads ``2e-5`` as a float (YAML 1.2), not as the string PyYAML's 1.1 rules give."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_scalar(text: str) -> Any:
    """One command-line value, read as a YAML scalar: ``2e-5`` -> 2e-05, ``false`` -> False, ``[0.9, 0.95]``."""
    return yaml.load(text, Loader=_Yaml12Loader) if text.strip() else text


def load_file(path: str | pathlib.Path) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a plain nested dict."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise HeavyliftError(f"config file {str(path)!r}: unknown format {suffix!r}; use .yaml, .yml or .toml")
    text = path.read_text()
    if suffix == ".toml":
        try:
            tree = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise HeavyliftError(f"config file {str(path)!r} is not valid TOML: {e}") from e
    else:
        try:
            tree = yaml.load(text, Loader=_Yaml12Loader)
        except yaml.YAMLError as e:
            raise HeavyliftError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise HeavyliftError(f"config file {str(path)!r} must hold a mapping of keys to values, "
                             f"not a {type(tree).__name__}")
    return tree


def apply_overrides(tree: dict, args: list[str]) -> dict:
    """Return a copy of ``tree`` with dotted overrides applied.

    Accepted forms: ``--a.b value``, ``--a.b=value``, and a bare ``--a.b`` (followed by another flag or
    nothing) meaning ``true``. Values are YAML scalars, so ``--optim.betas "[0.9, 0.95]"`` gives a list.
    """
    tree = copy.deepcopy(tree)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(arg, arg, "--dotted.key value or --dotted.key=value")
        key, eq, text = arg[2:].partition("=")
        if eq:
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            text, i = args[i + 1], i + 2
        else:
            text, i = "true", i + 1
        _set_dotted(tree, key, parse_scalar(text))
    return tree


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(key, value, "a dotted key such as optim.lr")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[:depth + 1]), child, "a section (mapping) to set sub-keys in")
        node = child
    node[parts[-1]] = value


def closest(name: str, known: typing.Iterable[str]) -> str | None:
    """The known key most like ``name`` (a likely typo), or None."""
    hits = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return hits[0] if hits else None


def unknown_key(prefix: str, name: str, value: Any, known: typing.Iterable[str]) -> ConfigError:
    """The error for a key that does not exist: names the dotted key and suggests the closest one."""
    known = sorted(known)
    guess = closest(name, known)
    hint = f"did you mean '{prefix}{guess}'? " if guess else ""
    where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
    return ConfigError(f"{prefix}{name}", value, f"a known key ({hint}known keys {where}: {', '.join(known)})")


def build(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a nested dict; missing keys keep their defaults."""
    return _build_dataclass(cls, {} if data is None else data, prefix)


def _build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(prefix[:-1] or cls.__name__, data, f"a mapping with keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise unknown_key(prefix, str(name), value, fields)
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}", None, "a value (this key is required)")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lists to tuples and dicts to dataclasses."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(arm, value, key)
            except ConfigError as e:
                errors.append(e.allowed)
        raise ConfigError(key, value, " or ".join(errors + (["null"] if type(None) in args else [])))
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise ConfigError(key, value, "one of " + ", ".join(repr(a) for a in args))
    if origin is tuple:
        return _coerce_tuple(args, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "a list")
        return [_coerce(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping")
        kt, vt = args or (Any, Any)
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    return _coerce_plain(tp, value, key)


def _coerce_tuple(args: tuple, value: Any, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, value, "a list")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if args and len(value) != len(args):
        raise ConfigError(key, value, f"a list of {len(args)} items")
    return tuple(_coerce(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(args or [Any] * len(value), value)))


def _coerce_plain(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 4e8 written in float notation
            return int(value)
        raise ConfigError(key, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "a string")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(key, value, "one of " + ", ".join(repr(m.value) for m in tp)) from None
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        if isinstance(value, (str, pathlib.PurePath)):
            return tp(value)
        raise ConfigError(key, value, "a path")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(key, value, f"a value of type {getattr(tp, '__name__', tp)}")
