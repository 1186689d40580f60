"""Settings: safe defaults, a YAML file with flags on top, and clear messages for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from proxy_support import REPO

from proxy.settings.config import ConfigError, Listen, Settings, load_settings

SHA = "a" * 64


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cedargate.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file():
    settings = load_settings()
    assert (settings.proxy.host, settings.proxy.port) == ("127.0.0.1", 8080)
    assert (settings.api.host, settings.api.port) == ("127.0.0.1", 8081)
    assert settings.allow_non_loopback is False
    assert settings.policy_dir == Path("policies")
    assert settings.policy_reload_interval == 1.0
    assert settings.agents == {}
    assert settings.context_headers == ("content-type", "user-agent", "accept")
    assert settings.max_body_bytes == 65536
    assert settings.database_url is None
    assert settings.effective_database_url == "sqlite:///.cedargate/cedargate.db"


def test_client_limits_have_safe_defaults():
    settings = load_settings()
    assert settings.max_request_body_bytes == 10 * 1024 * 1024
    assert settings.max_header_bytes == 64 * 1024
    assert (settings.header_read_timeout, settings.idle_timeout) == (10.0, 60.0)
    assert settings.max_unauthenticated_connections is None  # derived from the open-file limit


def test_the_json_inspection_limit_cannot_exceed_the_body_limit(tmp_path: Path):
    path = _yaml(tmp_path, "max_body_bytes: 2048\nmax_request_body_bytes: 1024\n")
    with pytest.raises(ConfigError, match=r"max_body_bytes \(2048\) exceeds max_request_body_bytes \(1024\)"):
        load_settings(path)


def test_workers_one_process_by_default_a_file_sets_more_and_the_flag_wins(tmp_path: Path):
    assert load_settings().workers == 1
    path = _yaml(tmp_path, "workers: 4\n")
    assert load_settings(path).workers == 4
    assert load_settings(path, {"workers": 2}).workers == 2
    with pytest.raises(ConfigError, match=r"workers: Input should be greater than or equal to 1"):
        load_settings(path, {"workers": 0})


def test_settings_reach_a_worker_whole():
    """`--workers N` hands each worker the supervisor's settings as JSON: nothing may be lost on the way."""
    settings = load_settings(REPO / "cedargate.yaml", {"workers": 2, "proxy.port": 0})
    assert Settings.model_validate_json(settings.model_dump_json()) == settings


def test_the_repositorys_own_config_loads():
    settings = load_settings(REPO / "cedargate.yaml")
    assert settings.policy_dir == Path("policies")
    assert settings.agents["ops-bot"].token_env == "CEDARGATE_OPS_BOT_TOKEN"


@pytest.mark.parametrize("written, seconds", [("55s", 55), ("2m", 120), ("1h", 3600), (30, 30), (2.5, 2.5),
                                              ("'40'", 40)])
def test_hold_max_wait_is_a_duration_like_the_other_settings_or_seconds(tmp_path: Path, written, seconds):
    assert load_settings(_yaml(tmp_path, f"hold_max_wait: {written}\n")).hold_max_wait == seconds


def test_the_repositorys_config_writes_hold_max_wait_as_a_duration():
    assert "\nhold_max_wait: 55s " in (REPO / "cedargate.yaml").read_text()
    assert load_settings(REPO / "cedargate.yaml").hold_max_wait == 55


def test_file_values_and_overrides_where_flags_win(tmp_path: Path):
    path = _yaml(
        tmp_path,
        f"""
proxy:
  host: 127.0.0.1
  port: 9090
api:
  port: 9091
policy_dir: /srv/policies
state_dir: /var/lib/cedargate
context_headers: [Content-Type, X-Team]
agents:
  ops-bot:
    token_sha256: {SHA}
""",
    )
    settings = load_settings(
        path, {"proxy.port": 7000, "policy_dir": "/other", "api.host": None, "database_url": None}
    )

    assert settings.proxy.port == 7000  # flag wins
    assert settings.proxy.host == "127.0.0.1"  # untouched sibling of an overridden key is kept
    assert settings.api.port == 9091  # a None override (flag not given) does not erase the file's value
    assert settings.policy_dir == Path("/other")
    assert settings.context_headers == ("content-type", "x-team")
    assert settings.agents["ops-bot"].token_sha256 == SHA
    assert settings.effective_database_url == "sqlite:////var/lib/cedargate/cedargate.db"


def test_override_creates_a_missing_section(tmp_path: Path):
    settings = load_settings(_yaml(tmp_path, "policy_dir: p\n"), {"api.port": 0})
    assert settings.api.port == 0 and settings.api.host == "127.0.0.1"


def test_empty_file_is_all_defaults(tmp_path: Path):
    assert load_settings(_yaml(tmp_path, "# nothing yet\n")) == Settings()


def test_database_url_given_is_used():
    url = "postgresql+psycopg://u@127.0.0.1:5432/cedargate"
    assert load_settings(overrides={"database_url": url}).effective_database_url == url


@pytest.mark.parametrize(
    "text, where, words",
    [
        ("proxy:\n  port: 70000\n", "proxy.port", "less than or equal to 65535"),
        ("api:\n  port: -1\n", "api.port", "greater than or equal to 0"),
        ("proxy:\n  port: eighty\n", "proxy.port", "valid integer"),
        ("polcy_dir: policies\n", "polcy_dir", "Extra inputs are not permitted"),
        ("proxy:\n  hostname: 0.0.0.0\n", "proxy.hostname", "Extra inputs are not permitted"),
        (
            f"agents:\n  bot:\n    token_sha256: {SHA}\n    token_env: BOT_TOKEN\n",
            "agents.bot",
            "exactly one of",
        ),
        ("agents:\n  bot: {}\n", "agents.bot", "exactly one of"),
        ("agents:\n  bot:\n    token_sha256: abc123\n", "agents.bot.token_sha256", "pattern"),
        (f"agents:\n  bot:\n    token_sha256: {'A' * 64}\n", "agents.bot.token_sha256", "pattern"),
        (f"agents:\n  'bad:id':\n    token_sha256: {SHA}\n", "agents", "without ':' or spaces"),
        ("max_body_bytes: -5\n", "max_body_bytes", "greater than or equal to 0"),
        ("policy_reload_interval: -1\n", "policy_reload_interval", "greater than or equal to 0"),
        ("passthrough_hosts: ['(pinned']\n", "passthrough_hosts", "is not a regular expression"),
        ("max_header_bytes: 100\n", "max_header_bytes", "greater than or equal to 1024"),
        ("header_read_timeout: 0\n", "header_read_timeout", "greater than 0"),
        ("max_unauthenticated_connections: 0\n", "max_unauthenticated_connections",
         "greater than or equal to 1"),
        ("hold_max_wait: soon\n", "hold_max_wait", "not a duration like 90s"),
        ("hold_max_wait: -5\n", "hold_max_wait", "greater than or equal to 0"),
        ("cedar_request_retention: forever\n", "cedar_request_retention", "not a duration like 90s"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, text: str, where: str, words: str):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"config file {path} has bad values:")
    assert f"  {where}: " in message
    assert words in message


def test_bad_override_is_reported_as_settings():
    with pytest.raises(ConfigError, match=r"^settings has bad values:\n  proxy\.port: "):
        load_settings(overrides={"proxy.port": 99999})


def test_invalid_yaml_is_refused(tmp_path: Path):
    path = _yaml(tmp_path, "proxy: [port: 1\n")
    with pytest.raises(ConfigError, match=rf"^config file {path}: not valid YAML"):
        load_settings(path)


@pytest.mark.parametrize("text", ["- a\n- list\n", "just a sentence\n", "42\n"])
def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match="must be a mapping of settings"):
        load_settings(path)


def test_missing_file_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path / "nope.yaml")


def test_listen_loopback():
    assert Listen(host="127.0.0.1").is_loopback
    assert Listen(host="::1").is_loopback
    assert Listen(host="localhost").is_loopback
    assert not Listen(host="0.0.0.0").is_loopback
    assert not Listen(host="example.com").is_loopback


# ---- regressions: each was a fail-open or crash before it was fixed -------------------------------


@pytest.mark.parametrize(
    "raw", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "proxy:\n  host: caf\xe9\n".encode("latin-1")]
)
def test_a_binary_or_non_utf8_file_is_a_config_error(tmp_path: Path, raw: bytes):
    path = tmp_path / "cedargate.yaml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match=str(path)):
        load_settings(path)


@pytest.mark.parametrize("section", ["proxy:\n#  port: 8080\n", "proxy: 8080\n"])
def test_flag_override_into_an_empty_or_scalar_section(tmp_path: Path, section: str):
    path = _yaml(tmp_path, section)
    try:
        settings = load_settings(path, {"proxy.port": 9000})
    except ConfigError as exc:  # a clear refusal is acceptable too
        assert "proxy" in str(exc)
    else:
        assert settings.proxy.port == 9000
