"""The metrics module: counts as recorded, and values shared between processes through one directory
(`cedargate run`'s way of showing every worker in one scrape), in real separate Python processes."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proxy.observe import metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_decision_is_counted_under_its_outcome_and_action_and_under_each_determining_policy() -> None:
    decided = {"outcome": "deny", "action": "delete"}
    before = metrics.sample("cedargate_decisions_total", decided) or 0.0
    by_policy = {p: metrics.sample("cedargate_decision_policies_total", {"outcome": "deny", "policy": p}) or 0.0
                 for p in ("a-policy", "z-policy")}
    for _ in range(3):
        metrics.count_decision("deny", "delete", ("z-policy", "a-policy"))
    assert metrics.sample("cedargate_decisions_total", decided) == before + 3
    for policy, was in by_policy.items():
        assert metrics.sample("cedargate_decision_policies_total", {"outcome": "deny", "policy": policy}) == was + 3


def test_decision_series_stay_linear_in_the_policies_whatever_combinations_agents_trigger() -> None:
    # Forbids conditioned on what the agent sends can be matched in any combination it picks: 1023 here.
    forbids = [f"agent-chosen-forbid-{n}" for n in range(10)]
    for size in range(1, len(forbids) + 1):
        for subset in itertools.combinations(forbids, size):
            metrics.count_decision("deny", "post", subset)
    series = [labels for name, labels in samples(metrics.exposition().decode())
              if name.startswith("cedargate_decision") and name.endswith("_total")
              and "agent-chosen-forbid-" in str(labels)]
    assert len(series) == len(forbids), f"{len(series)} series for {len(forbids)} policies"
    assert metrics.sample("cedargate_decision_policies_total",
                          {"outcome": "deny", "policy": "agent-chosen-forbid-0"}) == 2 ** 9  # subsets holding it


def test_the_override_requests_are_counted_at_scrape_time_and_a_failing_store_is_said() -> None:
    counts = {"pending": 2, "granted": 0}
    text = metrics.exposition([metrics.OverrideStatusCollector(lambda: counts)]).decode()
    seen = samples(text)
    assert seen[("cedargate_override_requests", (("status", "pending"),))] == 2
    assert seen[("cedargate_override_requests", (("status", "granted"),))] == 0
    assert seen[("cedargate_override_requests_readable", ())] == 1

    def broken() -> dict[str, int]:
        raise OSError("database is locked")

    seen = samples(metrics.exposition([metrics.OverrideStatusCollector(broken)]).decode())
    assert seen[("cedargate_override_requests_readable", ())] == 0
    assert not any(name == "cedargate_override_requests" for name, _ in seen)
    assert any(name == "cedargate_decisions_total" for name, _ in seen)  # the rest still answers


# A process that shares its metrics as `cedargate run` does, counts, starts a second process (which
# inherits the directory, as a worker does) that counts and holds a call, and scrapes after it ended.
SUPERVISOR = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    from proxy.observe import metrics

    metrics.count_decision("allow", "get", ("ops-read",))  # before sharing: not in the directory's counts
    metrics.share_between_processes(Path(sys.argv[1]))
    metrics.count_decision("allow", "get", ("ops-read",))
    metrics.count_decision("allow", "get", ("ops-read",))
    metrics.live_revision("rev-1")
    worker = subprocess.run([sys.executable, "-c", sys.argv[2]], check=True, capture_output=True, text=True)
    print(metrics.exposition().decode())
    print("---")
    metrics.process_gone(int(worker.stdout))
    print(metrics.exposition().decode())
""")
WORKER = textwrap.dedent("""
    import os
    from proxy.observe import metrics

    for _ in range(3):
        metrics.count_decision("allow", "get", ("ops-read",))
    metrics.HELD_CALLS.inc()
    metrics.live_revision("rev-2", "rev-1")
    print(os.getpid())
""")


def test_processes_sharing_a_directory_are_summed_in_one_scrape(tmp_path: Path) -> None:
    shared = tmp_path / "metrics"
    shared.mkdir()
    (shared / "counter_99999.db").write_bytes(b"left by an earlier run")
    done = subprocess.run([sys.executable, "-c", SUPERVISOR, str(shared), WORKER], capture_output=True, text=True,
                          timeout=60, check=True)
    while_alive, after = (samples(part) for part in done.stdout.split("---"))
    allowed = ("cedargate_decisions_total", (("action", "get"), ("outcome", "allow")))
    assert while_alive[allowed] == after[allowed] == 5  # the supervisor's 2 and the worker's 3: nothing stale
    # The worker exited without being marked gone: its held call still counts; once marked, it does not.
    assert while_alive[("cedargate_held_calls", ())] == 1
    assert after[("cedargate_held_calls", ())] == 0
    assert after[("cedargate_policy_revision", (("revision", "rev-1"),))] == 1  # the supervisor's own view
    assert not (shared / "counter_99999.db").exists()


# A process sharing its metrics, beside a worker's value file that exists but is still empty: prometheus_client
# creates a file and then sizes it, so a scrape can find it so (the worker about to write, or killed between
# the two: prometheus/client_python#1199). Read and printed: the scrape, then the worker's own values.
WITH_AN_EMPTY_FILE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from proxy.observe import metrics

    shared = Path(sys.argv[1])
    metrics.share_between_processes(shared)
    metrics.count_decision("allow", "get", ("ops-read",))
    (shared / "counter_4242.db").touch()
    (shared / "gauge_livesum_4242.db").touch()
    print(metrics.exposition().decode())
    print("---")
    print(json.dumps({str(pid): len(found) for pid, found in
                      metrics.by_process(["cedargate_held_calls"], [4242]).items()}))
""")


def test_a_value_file_still_empty_holds_nothing_and_fails_no_scrape(tmp_path: Path) -> None:
    shared = tmp_path / "metrics"
    done = subprocess.run([sys.executable, "-c", WITH_AN_EMPTY_FILE, str(shared)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    scraped, worker = done.stdout.split("---")
    assert samples(scraped)[("cedargate_decisions_total", (("action", "get"), ("outcome", "allow")))] == 1
    assert worker.strip() == "{}"


# A `cedargate run` as far as its metrics directory goes: it claims one, says which, and lives until told.
CLAIMANT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from proxy.observe import metrics

    print(metrics.claim_directory(Path(sys.argv[1])), flush=True)
    sys.stdin.read()
""")


def test_each_run_keeps_a_directory_of_its_own_and_an_ended_runs_is_removed_at_the_next_start(tmp_path: Path):
    parent = tmp_path / "metrics"

    def claimant() -> tuple[subprocess.Popen[str], Path]:
        run = subprocess.Popen([sys.executable, "-c", CLAIMANT, str(parent)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        assert run.stdout is not None
        return run, Path(run.stdout.readline().strip())

    (first, first_dir), (ended, ended_dir) = claimant(), claimant()
    try:
        assert first_dir != ended_dir and first_dir.parent == ended_dir.parent == parent
        (first_dir / "counter_1.db").write_bytes(b"the first run's values")
        ended.communicate("", timeout=30)
        (second, second_dir) = claimant()
        try:
            assert (first_dir / "counter_1.db").exists()  # a live run's directory is left alone
            assert not ended_dir.exists()
            assert sorted(parent.glob("run-*")) == sorted([first_dir, second_dir])
        finally:
            second.communicate("", timeout=30)
    finally:
        first.communicate("", timeout=30)
