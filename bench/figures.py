"""Writing a benchmark's figures: one JSON file under bench/results/, replaced whole."""

from __future__ import annotations

import json
from pathlib import Path


def write_figures(path: Path, figures: dict) -> None:
    """Write atomically, so a reader (or a run cut short) never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(figures, indent=2) + "\n")
    partial.replace(path)
