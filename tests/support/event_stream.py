"""Reading an event stream (text/event-stream) as an EventSource-conformant client does (WHATWG HTML,
9.2.6), for the tests of MCP answers: the events it dispatches from the bytes an agent received."""

from __future__ import annotations

import json
import re
from typing import Any


def sse_events(raw: bytes) -> list[dict[str, str | None]]:
    """Each event dispatched from `raw`: its type (`event`), last `id` and `data`; comments skipped."""
    lines = re.split(rb"\r\n|\r|\n", raw)[:-1]  # the last piece has no line end: never dispatched
    events: list[dict[str, str | None]] = []
    data: list[bytes] = []
    fields: dict[bytes, bytes] = {}
    for line in lines:
        if not line:
            if data:
                events.append({"event": fields.get(b"event", b"message").decode(),
                               "id": fields[b"id"].decode() if b"id" in fields else None,
                               "data": b"\n".join(data).decode()})
            data, fields = [], {}
            continue
        if line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            data.append(value)
        else:
            fields[name] = value
    return events


def sse_data(raw: bytes) -> list[Any]:
    """The data of each event dispatched from `raw`, read as JSON (an MCP message each)."""
    return [json.loads(event["data"] or "") for event in sse_events(raw)]
