"""Reading the end of a log file (train.log, engine.log) without reading the whole file."""

from __future__ import annotations

from pathlib import Path


def tail(path: str | Path, max_bytes: int = 64_000, lines: int | None = None) -> str:
    """The last `max_bytes` of a text file, starting at a whole line when cut, then only its last `lines` lines
    when given; '' when the file does not exist."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    if size > max_bytes:
        text = text.split("\n", 1)[-1]  # drop the partial first line
    return "\n".join(text.splitlines()[-lines:]) if lines is not None else text
