"""Text from another party (a client's rejection reason, a declined status) made safe to log:
printable, one line, bounded length, so it cannot spoof or flood an operator's terminal."""

from __future__ import annotations

MAX_TEXT = 200


def one_line(text: object, limit: int = MAX_TEXT) -> str:
    """Control characters (ANSI escapes, newlines) become '?'; longer text is cut with '...'."""
    raw = str(text)
    cleaned = "".join(c if c.isprintable() else "?" for c in raw[: limit + 1])
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
