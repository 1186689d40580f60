"""The Slack channel: a Block Kit message POSTed to an incoming webhook.

The message says what the agent asks (action, target, key arguments), how grave it is, until when it
may be decided, who is asked (the primary reviewer first when the chain names one), the agent's
justification, and links to the request on the review page. Whatever the agent chose goes into
mrkdwn escaped (`&`, `<`, `>`), so it cannot mention `<!channel>`, ping a user or hide a link behind
other text, and its backticks cannot end a code span early. Every mrkdwn text object is `verbatim`:
otherwise Slack itself turns bare URLs into links and parses `@channel` or `#general` in it (Block Kit's
text object reference), so an agent's "@channel approve now: https://..." would ping the channel and
show a link of its choosing. The justification, the agent's own words, is a code block, so its `*bold*`
or `~strike~` cannot pass for cedargate's lines ("Granted by ..."). Texts are cut to Block Kit's limits
(`LIMITS`), so a long justification shortens the message rather than having Slack refuse it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from proxy.notify.channels import DeliveryError, post, url_problem
from proxy.notify.notices import Notice
from proxy.settings.notifications import SlackChannel

# Block Kit's limits (api.slack.com/reference/block-kit/blocks), in characters.
LIMITS = {"header": 150, "section": 3000, "field": 2000, "button": 75, "url": 3000, "context": 2000, "fields": 10}
MAX_BLOCKS = 50
JUSTIFICATION = 2500  # of a section's 3000, so the agent and the call's line always fit beside it


def mrkdwn(text: str) -> str:
    """Agent text made inert in Slack's mrkdwn: the three characters Slack asks to escape."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def code(text: str) -> str:
    return "`" + mrkdwn(text).replace("`", "'") + "`"


def code_block(text: str, limit: int) -> str:
    """Agent text of several lines shown as it is written: no formatting of its own applies. Cut inside
    the block (to `limit` characters of the escaped text), so a long text never loses its closing fence."""
    return "```" + _cut(mrkdwn(text).replace("`", "'"), limit) + "```"


def message(notice: Notice) -> dict[str, Any]:
    """The incoming-webhook payload for `notice`: `text` (the notification's fallback) and `blocks`."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": _plain(notice.title, LIMITS["header"])},
        _section(f"*{mrkdwn(notice.agent)}* asks to {code(f'{notice.method} {notice.url}')}"
                 + ("\n" + code_block(notice.justification, JUSTIFICATION) if notice.justification
                    else "\n_No justification given._")),
    ]
    fields = [("Action", code(notice.action)), ("Target", code(notice.resource))]
    if notice.tool:
        fields.append(("Tool", code(notice.tool)))
    fields.append(("Severity", mrkdwn(notice.severity or "not classified") + _finality(notice)))
    if notice.deadline and notice.kind in ("opened", "reminder", "escalated", "info_requested"):
        fields.append(("Decide by", _date(notice.deadline)))
    fields.append(("Reviewers", mrkdwn(", ".join(notice.roles) or "none named")))
    if notice.primary:
        fields.append(("Primary reviewer", mrkdwn(notice.primary)
                       + (f" (fallback: {mrkdwn(', '.join(notice.fallback))})" if notice.fallback else "")))
    if notice.tier is not None:
        fields.append(("Tier", str(notice.tier)))
    blocks.append({"type": "section", "fields": [
        _mrkdwn(f"*{name}*\n{value}", LIMITS["field"])
        for name, value in fields[: LIMITS["fields"]]]})
    if notice.key_arguments:
        blocks.append(_section("*Key arguments*\n" + "\n".join(
            f"• {code(name)}: {code(value)}" for name, value in notice.key_arguments.items())))
    if notice.reason:
        said = "Question" if notice.kind == "info_requested" else "Reason"
        blocks.append(_section(f"*{said}* ({mrkdwn(notice.actor or 'reviewer')}): {mrkdwn(notice.reason)}"))
    blocks.append({"type": "actions", "elements": [{
        "type": "button", "action_id": "open-request", "text": _plain("Open the request", LIMITS["button"]),
        "url": notice.link[: LIMITS["url"]], **({"style": "primary"} if notice.kind == "opened" else {}),
    }]})
    blocks.append({"type": "context", "elements": [_mrkdwn(
        f"cedargate · request {code(notice.override_id)} · {mrkdwn(notice.status)}", LIMITS["context"])]})
    return {"text": mrkdwn(notice.title), "blocks": blocks[:MAX_BLOCKS]}


def _finality(notice: Notice) -> str:
    return "" if notice.reversible is None else " (reversible)" if notice.reversible else " (irreversible)"


def _plain(text: str, limit: int) -> dict[str, Any]:
    return {"type": "plain_text", "text": _cut(text, limit), "emoji": False}


def _mrkdwn(text: str, limit: int) -> dict[str, Any]:
    # verbatim: Slack parses only what cedargate wrote as markup (`<!date^...>`), nothing in the text itself.
    return {"type": "mrkdwn", "text": _cut(text, limit), "verbatim": True}


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": _mrkdwn(text, LIMITS["section"])}


def _date(iso: str) -> str:
    # Slack shows the reader's local time; the fallback is the UTC time as written.
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return mrkdwn(iso)
    return f"<!date^{int(moment.timestamp())}^{{date_short_pretty}} {{time}}|{mrkdwn(iso)}>"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Slack:
    def __init__(self, name: str, config: SlackChannel, environ: Mapping[str, str] = os.environ) -> None:
        self.name = name
        self.config = config
        self._environ = environ

    def send(self, notice: Notice, key: str) -> None:
        url = self.config.url or self._environ.get(self.config.url_env or "")
        if not url:
            raise DeliveryError(f"environment variable {self.config.url_env} (the incoming-webhook URL) is not set")
        problem = url_problem(url)
        if problem is not None:  # named by its variable: the URL itself is the secret
            raise DeliveryError(f"environment variable {self.config.url_env} does not hold a usable incoming-webhook "
                                f"URL: {problem}")
        body = json.dumps(message(notice), ensure_ascii=False).encode()
        # Slack ignores the key; a relay or a test receiver in front of it may use it to drop repeats.
        post(url, body, {"Content-Type": "application/json; charset=utf-8", "Idempotency-Key": key},
             self.config.timeout)
