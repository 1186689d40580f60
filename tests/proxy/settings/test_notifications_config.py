"""The `notifications:` section of cedargate.yaml: a good one loads as written; each mistake is refused
at load with its path in the file and what to write instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.settings.config import ConfigError, load_settings
from proxy.settings.notifications import NoticeKind

GOOD = {
    "review_url": "https://cedargate.example.com/",
    "channels": {
        "ops-hook": {"type": "webhook", "url": "https://hooks.example.com/cedargate", "secret_env": "HOOK_SECRET"},
        "ops-slack": {"type": "slack", "url_env": "SLACK_URL"},
        "reviewers": {"type": "email", "from": "cedargate@example.com", "host": "smtp.example.com",
                      "username_env": "SMTP_USER", "password_env": "SMTP_PASSWORD", "to": ["oncall@example.com"]},
    },
    "routes": [{"events": ["opened", "escalated"], "roles": ["engineering-manager"], "channels": ["ops-slack"]},
               {"events": ["decided", "expired"], "channels": ["ops-hook", "reviewers"]}],
}


def load(tmp_path: Path, notifications: dict, **extra) -> object:
    path = tmp_path / "cedargate.yaml"
    path.write_text(yaml.safe_dump({"notifications": notifications, **extra}))
    return load_settings(path)


def test_a_good_section_loads_as_written(tmp_path):
    settings = load(tmp_path, GOOD, approvers={"erin": {"token_env": "E", "roles": ["engineering-manager"],
                                                         "email": "erin@example.com"}})
    notifications = settings.notifications  # type: ignore[attr-defined]
    assert notifications.review_url == "https://cedargate.example.com"
    assert sorted(notifications.channels) == ["ops-hook", "ops-slack", "reviewers"]
    assert notifications.channels["reviewers"].sender == "cedargate@example.com"
    assert notifications.routes[1].kinds == {NoticeKind.GRANTED, NoticeKind.DENIED, NoticeKind.EXPIRED}
    assert settings.approvers["erin"].email == "erin@example.com"  # type: ignore[attr-defined]


def test_no_section_means_no_notifications(tmp_path):
    settings = load_settings(None)
    assert settings.notifications.channels == {} and settings.notifications.routes == ()


@pytest.mark.parametrize("change, message", [
    (lambda n: n["routes"][0].update(channels=["ops-slak"]),
     "routes[0] names unknown channel(s) ops-slak (channels: ops-hook, ops-slack, reviewers)"),
    (lambda n: n["routes"][0].update(events=["approved"]), "unknown event 'approved'; the events are opened,"),
    (lambda n: n["channels"]["ops-hook"].update(url="ftp://hooks.example.com"),
     "notifications.channels.ops-hook.webhook.url: Value error, the URL (ftp://hooks.example.com...) is not "
     "an http(s) URL"),
    (lambda n: n["channels"]["ops-hook"].pop("secret_env"),
     "notifications.channels.ops-hook.webhook.secret_env: Field required"),
    (lambda n: n["channels"]["ops-hook"].update(secret_env="not a name"),
     "notifications.channels.ops-hook.webhook.secret_env: String should match pattern"),
    (lambda n: n["channels"]["ops-slack"].update(url="https://hooks.slack.com/services/T/B/X"),
     "give exactly one of url and url_env"),
    (lambda n: n["channels"]["reviewers"].pop("password_env"), "give both username_env and password_env"),
    (lambda n: n["channels"]["reviewers"].update({"from": "cedargate"}), "'cedargate' is not an email address"),
    (lambda n: n["channels"]["ops-hook"].update(type="teams"), "notifications.channels.ops-hook: Input tag 'teams'"),
    (lambda n: n.update(retry_max="soon"), "'soon' is not a duration like 90s"),
    (lambda n: n.update(review_url="cedargate.example.com"), "is not an http(s) URL with a host"),
])
def test_each_mistake_is_refused_naming_where_and_why(tmp_path, change, message):
    notifications = yaml.safe_load(yaml.safe_dump(GOOD))
    change(notifications)
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, notifications)
    assert message in str(refused.value)


def test_an_approver_email_that_is_no_address_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="approvers.erin.email: Value error, 'erin@example.com\\\\nBcc: x@y' is not"):
        load(tmp_path, {}, approvers={"erin": {"token_env": "E", "roles": ["a"],
                                               "email": "erin@example.com\nBcc: x@y"}})
