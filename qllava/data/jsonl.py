"""JSON Lines: one JSON value per line, each parse error naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from qllava.errors import QllavaError, problem_list


def parse_jsonl(text: str, path: str | Path, problems: list[str] | None = None) -> list[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of `text`, read from `path`.

    Every line that is not JSON is a problem: appended to `problems` when given (the caller reports them with
    its own), else raised together in one error.
    """
    rows, bad = [], []
    # split on \n only: str.splitlines() also breaks at U+2028 and friends, valid inside JSON strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            bad.append(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one object per line")
    if problems is not None:
        problems += bad
    elif len(bad) == 1:
        raise QllavaError(bad[0])
    elif bad:
        raise QllavaError(f"{len(bad)} lines of {path} are not valid JSON:\n{problem_list(bad)}")
    return rows
