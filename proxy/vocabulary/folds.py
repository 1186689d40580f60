"""How servers that match JSON keys ignoring case compare them (Go's encoding/json, Jackson's
case-insensitive mode): the calls' ambiguity checks and the policy bundle's argument names share it."""

from __future__ import annotations


def fold_key(key: str) -> str:
    """A JSON key as servers that match keys ignoring case compare it, or more loosely: refusing more
    than they match is safe. Python's casefold covers Go's folding of 'ſ' to s and the Kelvin sign to
    k (and folds ß to ss); the dotless ı and the dotted İ (casefolded to i and a combining dot) are
    taken for i, as Java's equalsIgnoreCase takes them."""
    if key.isascii():
        return key.lower()
    return key.casefold().replace("\u0131", "i").replace("i\u0307", "i")
