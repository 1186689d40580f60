#!/usr/bin/env python3
"""What the collector's full passes still walk beside N held calls: the loop timers and their Contexts.

In one process, without sockets: N holds (`Holds.wait`, default 10,000, each due in 1800 s as
`held_calls.py` holds them) fall asleep and are frozen (`gc.freeze()`, as `HeldHeap` does); then other
traffic sets and cancels K timers (default 3,000), as mitmproxy's per-connection timeout watchdog does
(600 s, cancelled when the connection closes), with a timer due sooner at the loop heap's head. Reported:
the objects the collector tracks per hold (what a freeze moves, and a hand-back's full pass walks), those
it still tracks outside the frozen, by type, and the loop's heap of timers. Run it on two builds by
PYTHONPATH to compare (a timer per hold keeps every cancelled timer in the loop's heap until the cancelled
are half of it). Figures: bench/results/hold_timers.json (appended, one line a run).

    PYTHONPATH=. .venv/bin/python bench/hold_timers.py [--held 10000] [--traffic 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
from collections import Counter
from pathlib import Path

from proxy.oversight.holds import Holds

REPO = Path(__file__).resolve().parent.parent
KINDS = ("TimerHandle", "Context", "Task", "Future", "coroutine")


async def census(held: int, traffic: int) -> dict[str, object]:
    holds = Holds()
    loop = asyncio.get_running_loop()
    gc.collect()
    before = len(gc.get_objects())
    waiters = [asyncio.create_task(holds.wait(f"o-{n}", 1800)) for n in range(held)]
    while holds.held < held:
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    gc.collect()
    per_hold = (len(gc.get_objects()) - before) / held
    gc.freeze()
    sooner = loop.call_later(5, lambda: None)
    for n in range(traffic):
        loop.call_later(600, lambda: None).cancel()
        if n % 100 == 0:
            await asyncio.sleep(0)
    gc.collect()
    tracked = gc.get_objects()
    kinds = Counter(type(o).__name__ for o in tracked)
    figures = {"held": held, "tracked_per_hold": round(per_hold, 2), "traffic_timers": traffic,
               "tracked_outside_frozen": len(tracked),
               "loop_timer_heap": len(loop._scheduled),  # type: ignore[attr-defined]
               **{kind: kinds[kind] for kind in KINDS}}
    sooner.cancel()
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    gc.unfreeze()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held", type=int, default=10_000)
    parser.add_argument("--traffic", type=int, default=3_000, help="timers set and cancelled by other traffic")
    parser.add_argument("--label", help="the build's name in the figures (default: its git commit)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hold_timers.json")
    args = parser.parse_args()
    figures = asyncio.run(census(args.held, args.traffic))
    import proxy

    tree = Path(proxy.__file__).resolve().parent.parent
    label = args.label or subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip() or str(tree)
    figures = {"build": label, **figures}
    print(json.dumps(figures))
    with args.out.open("a") as out:
        out.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
