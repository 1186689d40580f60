"""The API's JSON answers: every string as the JSON the agent sent it, whatever it holds.

JSON text may escape a lone surrogate (`"\\ud83d"`), and Python reads it as a str that UTF-8 cannot
encode: an answer written with `ensure_ascii=False` (Starlette's) then fails with a 500, so one agent's
call could make the request it opened impossible to review. Written as ASCII, such a string goes back
out escaped, as it came in.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse


class JSONAnswer(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
