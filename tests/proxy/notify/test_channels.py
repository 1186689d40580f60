"""What a failed try says (in /status and the log) about a channel whose URL is a secret: which
variable to mend, never what it holds. A Slack incoming-webhook URL's path is its token."""

from __future__ import annotations

import logging

import pytest
from notify_support import open_request

from proxy.notify.notifier import missing_variables
from proxy.settings.notifications import Notifications

TOKEN = "xoxSecretPart9f2c"
# An env file's trailing comment, which docker's --env-file keeps in the value.
MALFORMED = f"http://127.0.0.1:9/services/T000/B000/{TOKEN} # ops alerts"


def slack_config() -> Notifications:
    return Notifications.model_validate({
        "channels": {"team": {"type": "slack", "url_env": "SLACK_URL"}},
        "routes": [{"events": ["opened"], "channels": ["team"]}],
        "retry_initial": "1s", "retry_max": "1s",
    })


def test_a_malformed_slack_url_is_reported_by_its_variable_never_by_its_secret_path(
        workflow, make_notifier, caplog: pytest.LogCaptureFixture) -> None:
    notifier = make_notifier(slack_config(), {"SLACK_URL": MALFORMED})
    open_request(workflow)
    with caplog.at_level(logging.WARNING):
        notifier.sweep()
    [state] = notifier.status()
    assert state.pending == 1 and state.last_error  # the try failed and the message was kept
    assert "SLACK_URL" in state.last_error and TOKEN not in state.last_error, state.last_error
    assert caplog.records and TOKEN not in caplog.text


def test_the_start_warning_names_a_malformed_url_variable_not_its_value() -> None:
    [warning] = missing_variables(slack_config(), {"SLACK_URL": MALFORMED})
    assert "SLACK_URL" in warning and "space" in warning and TOKEN not in warning
    assert missing_variables(slack_config(), {"SLACK_URL": "https://hooks.slack.example/services/T/B/x"}) == []
