"""Text from agents made safe to show a human: every character a terminal would act on, escaped.

An agent chooses its URLs, headers, bodies and justifications. Printed raw, an escape sequence in
them rewrites what a reviewer's terminal shows (ESC [2K erases the line, U+202E turns text around),
so a DELETE of a production host can display as a harmless POST. Everything cedargate prints for a
person (the `overrides`, `audit` and `explain` commands, and log lines built from a call) goes through
`printable` or `printable_json`; those are the only escaping functions, so every view escapes alike.
"""

from __future__ import annotations

import json
from typing import Any

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with every non-printable character as a visible escape (`\\x1b`, `\\u202e`, `\\n`).

    Non-printable is Python's `str.isprintable`: the C0 and C1 controls, DEL, format characters (bidi
    overrides and isolates, zero-width joiners, BOM), line and paragraph separators, every space but
    ASCII's (a no-break space can pass for a plain one), private-use, unassigned and surrogate code
    points. A backslash is doubled, so an escape shown always means the character, never the text.
    """
    if text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to escape
    return "".join(ch if ch.isprintable() and ch != "\\" else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable_json(value: Any, **dumps: Any) -> str:
    """`value` as JSON text with nothing a terminal acts on: JSON escapes every other character
    (ensure_ascii) but DEL, escaped here too; the result stays valid JSON."""
    return json.dumps(value, ensure_ascii=True, **dumps).replace("\x7f", "\\u007f")
