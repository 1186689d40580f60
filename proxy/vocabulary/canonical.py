"""The one canonical JSON: the byte form of a value wherever cedargate hashes it or compares it by bytes.

`canonical(value)` is keys sorted, no whitespace, UTF-8 (a lone surrogate, from undecodable bytes, as its
JSON escape) and datetimes as ISO 8601. The audit chain hashes rows in it (`proxy.record.audit`), so anyone
can check the log without cedargate; the engine keys its decision cache by it.

Override fingerprints were persisted before this function existed, in two other spellings: a pending
override must still match its call after an upgrade, so those bytes cannot change. They are the named
`Form`s below, kept here so that every byte form that is hashed is written once, and each is pinned by a
test against the `json.dumps` call it replaced. New uses take the default.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import Enum
from typing import Any


class Form(Enum):
    # The canonical form: sorted, compact, UTF-8. The audit chain's hashes are over it.
    STANDARD = "standard"
    # Sorted, compact, non-ASCII as \u escapes: an MCP message's binding, hashed into its fingerprint.
    ASCII = "ascii"
    # Sorted, ", " and ": " between items, non-ASCII as \u escapes: the override fingerprint itself.
    FINGERPRINT = "fingerprint"


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"canonical JSON holds only JSON values and datetimes, not {type(value).__name__}")


# What `json.dumps` with these options builds on every call; the audit writer hashes two objects per row.
_ENCODERS = {
    Form.STANDARD: json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_iso),
    Form.ASCII: json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_iso),
    Form.FINGERPRINT: json.JSONEncoder(sort_keys=True, ensure_ascii=True, default=_iso),
}


def canonical(value: Any, form: Form = Form.STANDARD) -> bytes:
    """`value` as the bytes that are hashed or compared."""
    return _ENCODERS[form].encode(value).encode("utf-8", "backslashreplace")


def canonical_text(value: Any) -> str:
    """The canonical form as text, e.g. a payload column that is later hashed as it is."""
    return canonical(value).decode("utf-8")
