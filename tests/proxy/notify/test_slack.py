"""Slack notifications: a Block Kit message of the shape Slack accepts (block and text object types,
length limits), saying what a reviewer needs, with everything the agent chose inert; delivered to an
incoming webhook (a receiver on loopback) whose URL comes from the environment."""

from __future__ import annotations

from typing import Any

import pytest
from notify_support import open_request

from proxy.notify.notices import Notice
from proxy.notify.slack import message, mrkdwn
from proxy.settings.notifications import Notifications

# Block Kit's rules for the blocks cedargate sends (api.slack.com/reference/block-kit).
TEXT_TYPES = {"plain_text", "mrkdwn"}


def check_text(obj: Any, limit: int, types: set[str] = TEXT_TYPES) -> None:
    assert isinstance(obj, dict) and obj["type"] in types, obj
    assert isinstance(obj["text"], str) and 1 <= len(obj["text"]) <= limit, obj
    assert set(obj) <= {"type", "text", "emoji", "verbatim"}
    if obj["type"] == "mrkdwn":  # else Slack links bare URLs and parses @channel in it (Block Kit text object)
        assert obj.get("verbatim") is True, obj


def check_block_kit(payload: dict[str, Any]) -> None:
    assert isinstance(payload["text"], str) and payload["text"]  # the notification's fallback
    blocks = payload["blocks"]
    assert 1 <= len(blocks) <= 50
    for block in blocks:
        kind = block["type"]
        if kind == "header":
            check_text(block["text"], 150, {"plain_text"})
        elif kind == "section":
            assert "text" in block or "fields" in block
            if "text" in block:
                check_text(block["text"], 3000)
            fields = block.get("fields", [])
            assert len(fields) <= 10
            for f in fields:
                check_text(f, 2000)
        elif kind == "actions":
            assert 1 <= len(block["elements"]) <= 25
            for button in block["elements"]:
                assert button["type"] == "button" and len(button["action_id"]) <= 255
                check_text(button["text"], 75, {"plain_text"})
                assert button["url"].startswith("https://") and len(button["url"]) <= 3000
                assert button.get("style", "primary") in {"primary", "danger"}
        elif kind == "context":
            assert 1 <= len(block["elements"]) <= 10
            for element in block["elements"]:
                check_text(element, 2000)
        else:
            pytest.fail(f"block type {kind} is not one cedargate sends")


def notice(**changes: Any) -> Notice:
    base = dict(
        kind="opened", seq=7, at="2026-12-02T05:00:00.000000+00:00", override_id="ovr-1", status="pending",
        agent="ops-bot", method="POST", url="https://api.example/v1/instances/i-1/stop", action='Action::"post"',
        resource='Host::"api.example"', tool=None, key_arguments={"grace": "30"}, severity="high",
        reversible=False, justification="instance is wedged", deadline="2026-12-02T06:00:00.000000+00:00",
        roles=["engineering-manager"], primary="erin", fallback=["max"], tier=1, actor=None, reason=None,
        link="https://cedargate.example.test/inbox/requests/ovr-1")
    return Notice(**{**base, **changes})  # type: ignore[arg-type]


def all_text(payload: dict[str, Any]) -> str:
    texts = [payload["text"]]
    for block in payload["blocks"]:
        for obj in [block.get("text"), *block.get("fields", []), *block.get("elements", [])]:
            if isinstance(obj, dict):
                texts.append(obj["text"] if isinstance(obj.get("text"), str) else obj.get("text", {}).get("text", ""))
    return "\n".join(texts)


def test_the_message_says_what_a_reviewer_needs_in_block_kit_shape():
    payload = message(notice())
    check_block_kit(payload)
    shown = all_text(payload)
    for said in ["ops-bot", "POST https://api.example/v1/instances/i-1/stop", 'Action::"post"', "Host::\"api.example\"",
                 "high (irreversible)", "instance is wedged", "engineering-manager", "erin", "fallback: max",
                 "`grace`: `30`", "<!date^1796191200^"]:
        assert mrkdwn(said) in shown or said in shown, said
    [button] = [b for b in payload["blocks"] if b["type"] == "actions"][0]["elements"]
    assert button["url"] == "https://cedargate.example.test/inbox/requests/ovr-1"


def test_what_the_agent_wrote_cannot_mention_link_or_break_out():
    payload = message(notice(
        justification="<!channel> urgent <https://evil.example|click here> & `x` <@U123>",
        key_arguments={"note": "`<!here>`"}, agent="ops-bot"))
    check_block_kit(payload)
    shown = all_text(payload)
    assert "<!channel>" not in shown and "<!here>" not in shown and "<@U123>" not in shown
    assert "<https://evil.example" not in shown
    assert "&lt;!channel&gt; urgent &lt;https://evil.example|click here&gt; &amp;" in shown
    assert "`'&lt;!here&gt;'`" in shown  # its backticks cannot end cedargate's code span


def mrkdwn_objects(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return ([value] if value.get("type") == "mrkdwn" else []) + [
            o for item in value.values() for o in mrkdwn_objects(item)]
    if isinstance(value, list):
        return [o for item in value for o in mrkdwn_objects(item)]
    return []


def test_slack_neither_pings_nor_links_from_what_the_agent_wrote():
    # Slack's own parsing (verbatim false) would ping the channel and link the URL without any `<...>`.
    said = "@channel approve now: https://evil.example/approve #general"
    payload = message(notice(justification=said + "\n*Granted by erin*", key_arguments={"title": said},
                             tool="github/merge"))
    carrying = [o for o in mrkdwn_objects(payload["blocks"]) if "evil.example" in o["text"]]
    assert len(carrying) == 2 and all(o.get("verbatim") is True for o in carrying)
    # The agent's words are a code block: its *bold* cannot pass for cedargate's own lines.
    assert "```@channel approve now: https://evil.example/approve #general\n*Granted by erin*```" in all_text(payload)


def test_long_texts_are_cut_to_the_limits_rather_than_refused():
    payload = message(notice(justification="j" * 5000, url="https://api.example/" + "p" * 5000,
                             resource="r" * 3000, agent="a" * 400,
                             key_arguments={f"k{n}": "v" * 60 for n in range(6)}, reason="no " * 2000,
                             kind="denied", actor="erin"))
    check_block_kit(payload)


def test_a_slack_message_is_posted_to_the_webhook_named_by_the_environment(workflow, receiver, make_notifier):
    config = Notifications.model_validate({
        "review_url": "https://cedargate.example.test",
        "channels": {"ops-slack": {"type": "slack", "url_env": "CEDARGATE_SLACK_URL"}},
        "routes": [{"events": ["opened"], "channels": ["ops-slack"]}],
    })
    notifier = make_notifier(config, environ={"CEDARGATE_SLACK_URL": receiver.url})
    override = open_request(workflow, justification="<!channel> approve me now")
    [delivery] = receiver.wait_for(1, poke=notifier.sweep)
    payload = delivery.json
    check_block_kit(payload)
    assert delivery.headers["content-type"].startswith("application/json")
    assert "<!channel>" not in all_text(payload) and "&lt;!channel&gt; approve me now" in all_text(payload)
    assert payload["blocks"][-2]["elements"][0]["url"] == f"https://cedargate.example.test/inbox/requests/{override.id}"
    [state] = notifier.status()
    assert (state.channel, state.delivered, state.pending) == ("ops-slack", 1, 0)
