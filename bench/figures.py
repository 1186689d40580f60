"""What the benchmarks share: timing calls one by one, summing them up, and writing the figures as one
JSON file under bench/results/, replaced whole."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def timed(fn, items, repeat: int = 1) -> list[float]:
    """Microseconds per call of `fn(item)`, for every item, `repeat` times over."""
    samples = []
    for _ in range(repeat):
        for item in items:
            start = time.perf_counter_ns()
            fn(item)
            samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def interleaved(cells: dict[str, tuple[Callable[[Any], object], Sequence[Any]]], repeat: int = 1,
                chunks: int = 10) -> dict[str, list[float]]:
    """`timed` for every cell `name: (fn, items)`, `repeat` times over its items, in turns that alternate
    between the cells (each turn a slice of each cell's items, the order reversed every other turn), so a
    machine that gets busier or quieter meanwhile weighs on every cell alike: cells timed back to back
    once reversed their own verdict under load."""
    samples: dict[str, list[float]] = {name: [] for name in cells}
    names = list(cells)
    turn = 0
    for _ in range(repeat):
        for chunk in range(chunks):
            for name in names if turn % 2 == 0 else reversed(names):
                fn, items = cells[name]
                samples[name] += timed(fn, items[chunk::chunks])
            turn += 1
    return samples


def summary(cells: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, mean and p99 of each cell's samples, in microseconds."""
    return {name: {"median_us": round(statistics.median(s), 2), "mean_us": round(statistics.fmean(s), 2),
                   "p99_us": round(sorted(s)[int(len(s) * 0.99)], 2)}
            for name, s in cells.items()}


def write_figures(path: Path, figures: dict) -> None:
    """Write atomically, so a reader (or a run cut short) never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(figures, indent=2) + "\n")
    partial.replace(path)


def report(path: Path, figures: dict) -> int:
    """Write the figures to `path` and show them; a benchmark's exit status (a missed goal is not a failure)."""
    write_figures(path, figures)
    print(json.dumps(figures, indent=2))
    return 0
