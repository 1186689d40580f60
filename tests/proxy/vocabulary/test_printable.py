"""What a person is shown of an agent's text: nothing a terminal acts on, everything still readable."""

from __future__ import annotations

import json

import pytest

from proxy.vocabulary.printable import printable, printable_json


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("POST \x1b[2K\rDELETE", "POST \\x1b[2K\\rDELETE"),  # ESC (C0), carriage return
        ("a\x00b\x07c\x7fd", "a\\x00b\\x07c\\x7fd"),  # NUL, BEL, DEL
        ("\x9b31m", "\\x9b31m"),  # C1 CSI: a one-character escape sequence on some terminals
        ("i-1\u202egol", "i-1\\u202egol"),  # right-to-left override
        ("\u2066x\u2069\u200f\u061c", "\\u2066x\\u2069\\u200f\\u061c"),  # bidi isolates and marks
        ("a\u200bb\ufeff", "a\\u200bb\\ufeff"),  # zero-width space, BOM
        ("line\u2028next\n", "line\\u2028next\\n"),
        ("no\u00a0break", "no\\xa0break"),  # passes for a space
        ("\U000e0041", "\\U000e0041"),  # a tag character
        ("C:\\x1b", "C:\\\\x1b"),  # a backslash typed by the agent is doubled: an escape means the character
    ],
)
def test_non_printable_characters_are_escaped(raw: str, shown: str):
    assert printable(raw) == shown


@pytest.mark.parametrize("text", ["http://127.0.0.1:9000/v1/instances/i-1/stop?zone=a&x=%1b",
                                  "Ünïcödé 日本 ✓", ""])
def test_printable_text_is_unchanged(text: str):
    assert printable(text) == text


def test_printable_json_is_valid_json_with_nothing_a_terminal_acts_on():
    value = {"url": "http://h/\x1b[2K\u202e\x7f", "n": 1, "ok": "é"}
    text = printable_json(value, indent=2)
    assert json.loads(text) == value
    assert all(c in "\n" or 0x20 <= ord(c) < 0x7f for c in text)
