"""Reading, overriding, type-checking and writing configs.

``load_config(path, overrides)`` reads a YAML mapping of sections, applies dotted overrides
(``model.num_layers=4``, ``optimizer.betas=[0.9,0.95]``, ``launch.partition=gpu``), checks every
value against the type hints of :mod:`megaret.config.schema`, and builds a validated
:class:`~megaret.config.schema.Config`. ``save_config`` writes the resolved config so that
``load_config`` reads it back to an equal Config.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from megaret.config.schema import SECTIONS, Config, ConfigError

CONFIG_FILENAME = "config.yaml"

# PyYAML (YAML 1.1) reads ``6e-4`` as a string; accept such text for float fields.
_FLOAT_RE = re.compile(r"^[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?$")
_NONE = type(None)


# --------------------------------------------------------------------------------------------
# schema introspection


@functools.cache
def _field_types(section: str) -> dict[str, Any]:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _field_types(s)]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _optional_inner(tp: Any) -> tuple[Any, bool]:
    """(T, True) for ``T | None``; (tp, False) otherwise."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not _NONE]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    inner, optional = _optional_inner(tp)
    if optional:
        return f"{_type_name(inner)} or null"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


# --------------------------------------------------------------------------------------------
# type checking / coercion


def _check(key: str, value: Any, tp: Any, expected: str | None = None, numbers_as_str: bool = False) -> Any:
    """Return ``value`` converted to ``tp`` or raise ``ConfigError('key: expected T, got ...')``.

    ``numbers_as_str``: accept an int/float where a str is expected (values of string mappings such
    as ``launch.extra_sbatch``, which YAML users write unquoted).
    """

    def mismatch() -> ConfigError:
        return ConfigError(f"{key}: expected {expected or _type_name(tp)}, got {_describe(value)}")

    inner, optional = _optional_inner(tp)
    if optional:
        if value is None:
            return None
        return _check(key, value, inner, expected=expected or _type_name(tp))
    origin = typing.get_origin(tp)
    if origin is typing.Literal:  # a choice: any string here, the section names the choices
        if isinstance(value, str):
            return value
        raise mismatch()
    if origin is list:
        if not isinstance(value, list | tuple):
            raise mismatch()
        (elem,) = typing.get_args(tp)
        return [_check(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise mismatch()
        ktp, vtp = typing.get_args(tp)
        return {
            _check(f"{key} key", k, ktp): _check(f"{key}.{k}", v, vtp, numbers_as_str=True)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise mismatch()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise mismatch()
    if tp is float:
        if isinstance(value, bool):
            raise mismatch()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value.strip().replace("_", ""))
        raise mismatch()
    if tp is str:
        if isinstance(value, str):
            return value
        if numbers_as_str and isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise mismatch()
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a schema bug, not a user error


# --------------------------------------------------------------------------------------------
# unknown keys


def _unknown(key: str) -> str:
    """One-line message for an unknown dotted key or section, with a did-you-mean when possible."""
    section, _, name = key.partition(".")
    if not name:
        match = difflib.get_close_matches(section, list(SECTIONS), n=1)
        if match:
            return f"{key}: unknown section; did you mean {match[0]}?"
        return f"{key}: unknown section; sections are {', '.join(SECTIONS)}"
    if section in SECTIONS:
        # same name in another section (train.lr -> optimizer.lr), a close name in this section,
        # then a close name anywhere
        by_name: dict[str, str] = {}
        for full in _all_keys():
            by_name.setdefault(full.partition(".")[2], full)
        same = [f"{section}.{m}" for m in difflib.get_close_matches(name, list(_field_types(section)), n=1)]
        anywhere = [by_name[m] for m in difflib.get_close_matches(name, list(by_name), n=1)]
        match = ([by_name[name]] if name in by_name else []) or same or anywhere
    else:
        match = difflib.get_close_matches(key, _all_keys(), n=1)
    if match:
        return f"{key}: unknown key; did you mean {match[0]}?"
    if section in SECTIONS:
        return f"{key}: unknown key; {section} has {', '.join(_field_types(section))}"
    return f"{key}: unknown key; sections are {', '.join(SECTIONS)}"


def _check_structure(data: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Check ``data`` is a mapping of known sections to mappings of known keys; return a copy."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{prefix}expected a mapping of sections (model:, train:, ...), got {_describe(data)}"
        )
    out: dict[str, dict[str, Any]] = {}
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(prefix + _unknown(str(section)))
        if body is None:
            body = {}
        if not isinstance(body, Mapping):
            raise ConfigError(f"{prefix}{section}: expected a mapping of keys, got {_describe(body)}")
        known = _field_types(section)
        for name in body:
            if name not in known:
                raise ConfigError(prefix + _unknown(f"{section}.{name}"))
        out[section] = dict(body)
    return out


# --------------------------------------------------------------------------------------------
# overrides


def _override_syntax(text: str) -> ConfigError:
    return ConfigError(f"{text!r}: overrides look like section.key=value")


def _parse_value(key: str, raw: str, tp: Any) -> Any:
    """Parse override text with YAML; a string field receives the raw text."""
    inner, optional = _optional_inner(tp)
    try:
        parsed = yaml.safe_load(raw)
        parse_error = None
    except yaml.YAMLError as exc:
        parsed, parse_error = None, str(exc).splitlines()[0]
    if inner is str:
        if parse_error is None and (isinstance(parsed, str) or (parsed is None and optional)):
            return parsed
        return raw
    if parse_error is not None:
        raise ConfigError(f"{key}: cannot parse {raw!r} as {_type_name(tp)} ({parse_error})")
    return parsed


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Return a copy of the section mapping ``data`` with the dotted ``overrides`` applied in order.

    Values are type-checked (and converted) against the schema here, so a bad override is reported
    with the override text. ``launch.extra_sbatch.gres=gpu:8`` sets one entry of a mapping field.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out = {section: dict(body) for section, body in _check_structure(data).items()}
    for text in overrides:
        if not isinstance(text, str) or "=" not in text:
            raise _override_syntax(str(text))
        key, raw = text.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        parts = key.split(".")
        if len(parts) < 2 or not all(p and not p.isspace() and " " not in p for p in parts):
            raise _override_syntax(text)
        where = f" (override {text!r})"
        section, name = parts[0], parts[1]
        if section not in SECTIONS or name not in _field_types(section):
            raise ConfigError(_unknown(f"{section}.{name}") + where)
        tp = _field_types(section)[name]
        body = out.setdefault(section, {})
        try:
            if len(parts) == 2:
                body[name] = _check(key, _parse_value(key, raw, tp), tp)
                continue
            if typing.get_origin(tp) is not dict:
                raise ConfigError(f"{key}: unknown key; {section}.{name} is {_type_name(tp)}, not a mapping")
            vtp = typing.get_args(tp)[1]
            entry = ".".join(parts[2:])
            current = body.get(name)
            mapping = dict(current) if isinstance(current, Mapping) else {}
            mapping[entry] = _check(key, _parse_value(key, raw, vtp), vtp)
            body[name] = mapping
        except ConfigError as exc:
            raise ConfigError(f"{exc}{where}") from None
    return out


# --------------------------------------------------------------------------------------------
# building / loading / saving


def config_from_dict(data: Mapping[str, Any], source: str | os.PathLike[str] | None = None) -> Config:
    """Build a validated Config from a nested mapping; unknown keys and wrong types are errors.

    ``source`` (a file name) prefixes unknown-key and type errors.
    """
    prefix = f"{source}: " if source is not None else ""
    sections = _check_structure(data, prefix)
    built = {}
    for section, cls in SECTIONS.items():
        types_ = _field_types(section)
        kwargs = {}
        for name, value in sections.get(section, {}).items():
            try:
                kwargs[name] = _check(f"{section}.{name}", value, types_[name])
            except ConfigError as exc:
                raise ConfigError(f"{prefix}{exc}") from None
        built[section] = cls(**kwargs)
    return Config(**built)


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (a YAML file, or a run dir holding config.yaml; None: the defaults), apply
    ``overrides`` (``section.key=value``, later ones win) and return the validated Config."""
    data: Any = {}
    source: str | None = None
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / CONFIG_FILENAME
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{source}: invalid YAML{line}: {problem}") from None
        data = _check_structure(data, f"{source}: ")
    data = apply_overrides(data, overrides)
    return config_from_dict(data, source)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (what save_config writes)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, run_dir: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` as ``run_dir/config.yaml`` (creating run_dir) and return that path.

    The file is written atomically; ``load_config`` on it returns a Config equal to ``cfg``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / CONFIG_FILENAME
    tmp = run_dir / f".{CONFIG_FILENAME}.{os.getpid()}.tmp"
    header = "# Resolved megaret config (all defaults filled in); load with megaret.config.load_config.\n"
    tmp.write_text(header + dump_config(cfg), encoding="utf-8")
    os.replace(tmp, target)
    return target
