"""JSON Lines: one JSON value per line, each parse error naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from qllava.errors import QllavaError


def parse_jsonl(text: str, path: str | Path) -> list[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of `text`, read from `path`."""
    rows = []
    # split on \n only: str.splitlines() also breaks at U+2028 and friends, valid inside JSON strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise QllavaError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one object per line") from None
    return rows
