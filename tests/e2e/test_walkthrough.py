"""The README's five-minute walk-through, run as written: its commands are read from README.md (the stand-in
API of step 1, the tokens, every `curl` of steps 3 and 4, the reviewer's commands) and each outcome a
comment promises (`# 200: ...`, `# 403 override-pending: ...`, `# held ..., then 501`) is checked against
the real cedargate started as `make run` starts it. Only the ports and the stand-in's directory are
changed (to free ones and a temporary one), so the README cannot drift from what happens again.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from e2e_support import CEDARGATE, REPO, Cedargate, start_cedargate

from tests.support.waiting import wait_until

# Any curl the README shows answers at once or is held; held longer than this, it reads as a hang.
PROMPT = 15
UUID = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\s", re.M)


def walkthrough() -> list[list[tuple[str, str]]]:
    """The walk-through's shell blocks, each a list of (command, the comment promising its outcome)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Five-minute walk-through", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        commands: list[tuple[str, str]] = []
        for line in block.replace("\\\n", " ").splitlines():
            code, _, comment = line.partition("#")
            if code.strip():
                commands.append((" ".join(code.split()), comment.strip()))
            elif comment.strip() and commands and not commands[-1][1]:
                commands[-1] = (commands[-1][0], comment.strip())  # a long command's comment is on its own line
        blocks.append(commands)
    return blocks


def exports(block: list[tuple[str, str]]) -> dict[str, str]:
    return dict(shlex.split(code)[1].split("=", 1) for code, _ in block if code.startswith("export "))


class Walk:
    """The places the README names, moved to this test's own."""

    def __init__(self, cloud: Path, upstream_port: int) -> None:
        self.cloud, self.upstream_port = cloud, upstream_port
        self.gate: Cedargate | None = None

    def localize(self, text: str) -> str:
        assert self.gate is not None
        text = text.replace("/tmp/cloud", str(self.cloud)).replace(":9000", f":{self.upstream_port}")
        return text.replace("127.0.0.1:8080", f"127.0.0.1:{self.gate.proxy_port}")

    def curl(self, code: str, proxy: str, timeout: float = PROMPT) -> subprocess.Popen[str]:
        argv = [self.localize(arg) for arg in shlex.split(code.replace("$PROXY", proxy))]
        assert argv[0] == "curl", code
        return subprocess.Popen([*argv, "-s", "-w", "\n%{http_code}", "--max-time", str(timeout)],
                                stdout=subprocess.PIPE, text=True)


def outcome(process: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = process.communicate(PROMPT + 5)
    body, _, status = out.rpartition("\n")
    return int(status), body


def check_promise(code: str, comment: str, status: int, body: str) -> None:
    promised = re.match(r"(\d{3})(?: ([a-z][a-z-]*))?:", comment)
    assert promised, f"the README's comment on `{code}` names no outcome: {comment!r}"
    got = f"no answer in {PROMPT} s (held?)" if status == 0 else f"{status}: {body}"
    assert status == int(promised.group(1)), f"`{code}`: the README promises {comment!r}, got {got}"
    if promised.group(2):
        assert json.loads(body)["type"] == f"urn:cedargate:problem:{promised.group(2)}", (code, body)
    elif status == 200:
        assert body.strip() in comment, f"`{code}`: the README shows {comment!r}, the API answered {body!r}"


def start(walk: Walk, state: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Cedargate:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)
    # What `make run` runs (checked below), on free ports and a state directory of the test's own.
    walk.gate = start_cedargate(REPO / "cedargate.yaml", "--listen-port", "0", "--api-port", "0",
                                "--state-dir", str(state))
    return walk.gate


def test_the_readme_walkthrough_does_what_it_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert "cedargate run --config cedargate.yaml" in (REPO / "Makefile").read_text().split("\nrun:", 1)[1]
    step1, step2, step3, restart, step4 = walkthrough()[:5]

    # 1. The stand-in cloud API, as the README starts it (on a free port, in a temporary directory).
    cloud = tmp_path / "cloud"
    setup, serve = (code for code, _ in step1)
    subprocess.run(["bash", "-c", setup.replace("/tmp/cloud", str(cloud))], check=True)
    server = subprocess.Popen([sys.executable if a == "python3" else a for a in shlex.split(
        serve.replace("/tmp/cloud", str(cloud)).replace(" 9000 ", " 0 "))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # http.server logs each request it serves on stderr.
    logged: list[str] = []
    threading.Thread(target=lambda: logged.extend(server.stderr or ()), daemon=True).start()

    def posts() -> int:
        return sum('"POST /v1/instances/i-0abc/stop' in line for line in list(logged))

    walk = None
    try:
        served = re.search(r"port (\d+)", server.stdout.readline() if server.stdout else "")
        assert served, "the stand-in API did not start"
        walk = Walk(cloud, int(served.group(1)))

        # 2. cedargate, with the agent's token from the README.
        assert [code for code, _ in step2][-1] == "make run"
        gate = start(walk, tmp_path / "state", exports(step2), monkeypatch)
        proxy = exports(step3)["PROXY"]

        # 3. Every call answers at once, as its comment says.
        for code, comment in step3:
            if code.startswith("curl"):
                status, body = outcome(walk.curl(code, proxy))
                check_promise(code, comment, status, body)
        output = "".join(gate.output)
        for policy in ("protect-production-instances", "no-volume-deletion"):
            assert f'policy "{policy}" (ops.cedar:' in output and "escalates to nobody" in output

        # 4. Restarted with the reviewer's token; the held call is released once erin approves.
        assert gate.stop() == 0
        (runs,) = [code for code, _ in restart]
        *assignments, make, target = shlex.split(runs)
        assert (make, target) == ("make", "run")
        gate = start(walk, tmp_path / "state", dict(a.split("=", 1) for a in assignments), monkeypatch)
        (held_code, held_comment), *reviewer = step4
        held = re.match(r"held \(up to \d+ s\), then (\d{3})", held_comment)
        assert held, held_comment
        posts_before = posts()
        agent = walk.curl(held_code, proxy, timeout=60)
        wait_until(lambda: "holding POST" in "".join(gate.output), "the call to be held")
        assert agent.poll() is None

        monkeypatch.setenv("CEDARGATE_API", gate.api_url)
        reviewer_env = exports(reviewer)
        listed = ""
        for code, _ in reviewer:
            if code.startswith("export"):
                continue
            argv = shlex.split(code)
            assert argv[0] == ".venv/bin/cedargate"
            if "<id>" in argv:
                (request_id,) = UUID.findall(listed)  # erin sees one request: the stop (not the volume)
                argv[argv.index("<id>")] = request_id
            run = subprocess.run([str(CEDARGATE), *argv[1:]], capture_output=True, text=True, timeout=30,
                                 env={**os.environ, **reviewer_env})
            assert run.returncode == 0, run.stderr
            listed = listed or run.stdout
        assert "POST http://127.0.0.1:9000/v1/instances/i-0abc/stop".replace(":9000", f":{walk.upstream_port}") \
            in listed
        status, _ = outcome(agent)
        assert status == int(held.group(1))
        wait_until(lambda: posts() == posts_before + 1, "the released call's log line")
        assert posts() == posts_before + 1  # upstream exactly once

        # 5. /status names what nobody can grant yet: erin's role is covered now, the others are not.
        with urllib.request.urlopen(f"{gate.api_url}/status", timeout=10) as answer:
            unreachable = {u["policy_id"] for u in json.load(answer)["unreachable_escalations"]}
        assert unreachable == {"no-volume-deletion", "large-refunds", "no-repository-deletion", "staging-after-hours"}
    finally:
        if walk and walk.gate:
            walk.gate.stop()
        server.terminate()
        server.wait(5)
