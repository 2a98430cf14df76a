"""Named SQL blocks loaded from core/data/sql/*.sql (`-- name: block_name` headers)."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from psycopg import sql

_HEADER = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def parse_blocks(text: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() : end].strip()
        name = match.group(1)
        if name in blocks:
            raise ValueError(f"duplicate SQL block name {name!r}")
        blocks[name] = body
    return blocks


@cache
def _all_blocks() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for entry in resources.files("core.data.sql").iterdir():
        if entry.name.endswith(".sql"):
            for name, body in parse_blocks(entry.read_text(encoding="utf-8")).items():
                if name in blocks:
                    raise ValueError(f"SQL block {name!r} defined twice")
                blocks[name] = body
    return blocks


def query(name: str) -> sql.SQL:
    """The named block as a psycopg SQL object (parameters are always bound, never formatted)."""
    try:
        return sql.SQL(_all_blocks()[name])
    except KeyError:
        raise KeyError(f"no SQL block named {name!r}") from None
