"""`--print-config`: every key with its value (the default, or the --config file's and overrides'),
its type, its default where the value differs, and a one-line description. The descriptions are the
comments beside (or just above) each field in megaret/config/schema.py: one source, read from the
schema's own text."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import tokenize
from typing import Any

from megaret.config.loader import _field_types, _type_name
from megaret.config.schema import SECTIONS, Config


@functools.cache
def field_descriptions(section: str) -> dict[str, str]:
    """{field: its comment} for one section's dataclass (a same-line comment, else the comment lines
    directly above the field)."""
    source = inspect.getsource(SECTIONS[section])
    fields = set(_field_types(section))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        name = line.strip().split(":", 1)[0]
        if name not in fields or name in out or not line.startswith("    ") or line.startswith("     "):
            continue
        text = comments.get(number)
        if text is None:  # the comment block right above
            above, k = [], number - 1
            while k in comments and lines[k - 1].strip().startswith("#"):
                above.insert(0, comments[k])
                k -= 1
            text = " ".join(above) or None
        if text:
            out[name] = text
    return out


def config_rows(cfg: Config) -> list[tuple[str, str, str, str, str]]:
    """(key, value, type, description, default) for every key, in the schema's order."""
    defaults = Config()
    rows = []
    for section in SECTIONS:
        values, base = getattr(cfg, section), getattr(defaults, section)
        docs = field_descriptions(section)
        for name, tp in _field_types(section).items():
            value, default = _show(getattr(values, name)), _show(getattr(base, name))
            rows.append((f"{section}.{name}", value, _type_name(tp), docs.get(name, ""), default))
    return rows


def format_config(cfg: Config) -> str:
    """The `--print-config` text: one block per key (its default named where the value differs)."""
    blocks = []
    for key, value, tp, doc, default in config_rows(cfg):
        kind = tp if value == default else f"{tp}; default {default}"
        blocks.append(f"{key} = {value}    ({kind})\n    {doc}")
    return "\n".join(blocks)


def _show(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return str(dataclasses.asdict(value))
    return "null" if value is None else str(value)
