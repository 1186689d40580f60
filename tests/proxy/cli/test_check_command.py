"""`cedargate check`: the policies valid, and each escalation no approver able to sign in could grant named
with its policy and role, reading the approvers of the config as `run` would."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from proxy.cli.main import main
from tests.support.launch import REPO

ONLY_ERIN = """approvers:
  erin: {token_env: CHECK_TEST_ERIN_TOKEN, roles: [engineering-manager, on-call]}
  sam: {token_env: CHECK_TEST_SAM_TOKEN, roles: [security]}
"""


def check(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_escalation_to_a_role_nobody_holds_is_a_warning_naming_policy_and_role(tmp_path: Path, policy_dir,
                                                                                  monkeypatch, capsys):
    config = tmp_path / "cedargate.yaml"
    config.write_text(ONLY_ERIN)
    monkeypatch.setenv("CHECK_TEST_ERIN_TOKEN", "t")
    monkeypatch.delenv("CHECK_TEST_SAM_TOKEN", raising=False)
    code, out, err = check(monkeypatch, capsys, str(policy_dir), "--config", str(config))
    assert code == 0  # a warning: the policies themselves are valid
    assert "14 policies valid" in out
    assert f"approvers from {config}: 1 of 2 can sign in here; 4 escalations cannot be granted" in out
    warnings = err.splitlines()
    assert all(line.startswith("cedargate: warning: policy ") for line in warnings)
    assert {line.split('"')[1] for line in warnings} == {"no-repository-deletion", "no-volume-deletion",
                                                         "large-refunds", "staging-after-hours"}
    # A chain's tier nobody holds is named with its tier: its time would pass with nobody told.
    assert any('"staging-after-hours" (ops.cedar:36) escalates to nobody at its chain\'s tier 2: tier 2 (after 10m): '
               'no configured approver holds role "secondary-on-call"' in w for w in warnings)
    assert any('"large-refunds"' in w and 'no configured approver holds role "finance"' in w for w in warnings)
    assert any('"no-repository-deletion"' in w and 'held only by sam, without a token' in w for w in warnings)


def test_every_escalation_reachable_is_said_plainly(tmp_path: Path, policy_dir, monkeypatch, capsys):
    config = tmp_path / "all.yaml"
    roles = ["engineering-manager", "security", "lead-engineer", "finance", "on-call", "secondary-on-call"]
    config.write_text("approvers:\n" + "".join(f"  a{i}: {{token_sha256: {'ab' * 32}, roles: [{r}]}}\n"
                                               for i, r in enumerate(roles)))
    code, out, err = check(monkeypatch, capsys, str(policy_dir), "--config", str(config))
    assert (code, err) == (0, "")
    assert out.endswith(f"approvers from {config}: 6 of 6 can sign in here; every escalation can be granted\n")


def test_without_a_config_it_reads_the_one_here_or_says_it_did_not_check(tmp_path: Path, policy_dir, monkeypatch,
                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = check(monkeypatch, capsys, str(policy_dir))
    assert code == 0 and out.endswith("approvers not checked: no cedargate.yaml here (give --config)\n")
    shutil.copy(REPO / "cedargate.yaml", tmp_path / "cedargate.yaml")
    for name in ("ERIN", "SAM", "LEE", "FRAN", "SID"):
        monkeypatch.delenv(f"CEDARGATE_{name}_TOKEN", raising=False)
    code, out, err = check(monkeypatch, capsys, str(policy_dir))
    assert code == 0 and "approvers from cedargate.yaml: 0 of 5 can sign in here; 6 escalations cannot" in out
    assert 'policy "protect-production-instances" (ops.cedar:21)' in err


def test_a_bad_config_is_an_error(tmp_path: Path, policy_dir, monkeypatch, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("approvers: {erin: {roles: []}}\n")
    code, _, err = check(monkeypatch, capsys, str(policy_dir), "--config", str(config))
    assert code == 1 and err.startswith(f"cedargate: config file {config} has bad values:")
