"""Agent credentials: the right token logs in, anything else does not, and tokens are never kept in clear."""

from __future__ import annotations

import hashlib
import logging

from proxy.settings.agents import AgentDirectory, hash_token, new_token
from proxy.settings.config import AgentCredential, load_settings

TOKEN = "t0ken-for-ops-bot-Zx81"


def test_hash_token_is_sha256_hex():
    assert hash_token(TOKEN) == hashlib.sha256(TOKEN.encode()).hexdigest()
    assert hash_token("é") == hashlib.sha256("é".encode()).hexdigest()


def test_new_tokens_are_long_random_and_usable():
    a, b = new_token(), new_token()
    assert a != b and len(a) >= 40
    directory = AgentDirectory({"bot": AgentCredential(token_sha256=hash_token(a))}, environ={})
    assert directory.verify("bot", a)
    assert not directory.verify("bot", b)


def test_verify_with_a_configured_hash():
    directory = AgentDirectory({"ops-bot": AgentCredential(token_sha256=hash_token(TOKEN))}, environ={})
    assert directory.agent_ids == {"ops-bot"}
    assert directory.verify("ops-bot", TOKEN)
    assert not directory.verify("ops-bot", TOKEN + "x")
    assert not directory.verify("ops-bot", "")
    assert not directory.verify("ops-bot", hash_token(TOKEN))  # the hash is not a password


def test_unknown_agent_cannot_log_in_with_any_token():
    directory = AgentDirectory({"ops-bot": AgentCredential(token_sha256=hash_token(TOKEN))}, environ={})
    assert not directory.verify("intruder", TOKEN)
    assert not directory.verify("", TOKEN)
    assert not directory.verify("intruder", "")


def test_token_env_is_read_from_the_given_environment():
    creds = {"ops-bot": AgentCredential(token_env="CEDARGATE_OPS_BOT_TOKEN")}
    directory = AgentDirectory(creds, environ={"CEDARGATE_OPS_BOT_TOKEN": TOKEN})
    assert directory.agent_ids == {"ops-bot"}
    assert directory.verify("ops-bot", TOKEN)
    assert not directory.verify("ops-bot", "wrong")


def test_token_env_is_read_once_at_start():
    environ = {"BOT_TOKEN": TOKEN}
    directory = AgentDirectory({"bot": AgentCredential(token_env="BOT_TOKEN")}, environ=environ)
    environ["BOT_TOKEN"] = "changed-later"
    assert directory.verify("bot", TOKEN)
    assert not directory.verify("bot", "changed-later")


def test_missing_or_empty_env_var_means_the_agent_cannot_log_in(caplog):
    creds = {
        "missing-bot": AgentCredential(token_env="NOT_SET_ANYWHERE"),
        "empty-bot": AgentCredential(token_env="EMPTY_TOKEN"),
        "ok-bot": AgentCredential(token_sha256=hash_token(TOKEN)),
    }
    with caplog.at_level(logging.WARNING, logger="proxy.settings.agents"):
        directory = AgentDirectory(creds, environ={"EMPTY_TOKEN": ""})
    assert directory.agent_ids == {"ok-bot"}
    assert not directory.verify("missing-bot", "")
    assert not directory.verify("empty-bot", "")
    assert "missing-bot" in caplog.text and "NOT_SET_ANYWHERE" in caplog.text
    assert "empty-bot" in caplog.text


def test_directory_from_the_repositorys_config(tmp_path):
    from proxy_support import REPO

    settings = load_settings(REPO / "cedargate.yaml")
    directory = AgentDirectory(settings.agents, environ={"CEDARGATE_OPS_BOT_TOKEN": TOKEN})
    assert directory.verify("ops-bot", TOKEN)
    assert not AgentDirectory(settings.agents, environ={}).verify("ops-bot", TOKEN)
