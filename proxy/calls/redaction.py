"""Secrets in query strings: kept out of the record, the logs and every view, as header secrets are.

`?access_token=...`, `?sig=...`, `?api_key=...` carry credentials in the URL itself. Policies decide
on the call as sent and a grant binds to it exactly (the override fingerprint hashes the unredacted
URL), but what is stored or shown of it (an override request's URL and Cedar context, decision
errors, audit payloads, log lines) has each secret parameter's value replaced with `[redacted]`.
Which parameter names are secret is `secret_query_params` in the settings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from proxy.cedar.context import CALL_TOOL, MCP_RPC, ROUTE_CONTEXT

REDACTED = "[redacted]"

DEFAULT_SECRET_QUERY_PARAMS = (
    "access_token", "refresh_token", "id_token", "token", "auth", "api_key", "apikey", "key", "sig",
    "signature", "password", "passwd", "secret", "client_secret", "code", "x-amz-signature",
    "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
)

# `&` separates parameters everywhere; some servers (older Python, Rails) also split on `;`, and a
# secret they would read must not be shown.
_SEPARATORS = re.compile(r"([&;])")
_ARRAY_SUFFIX = re.compile(r"\[[^\]]*\]$")  # token[]=... or api_key[0]=... (PHP, Rails)
# name=value inside free text, e.g. a URL quoted in an error message.
_PAIR = re.compile(r"(?<![\w.%\[\]-])([\w.%\[\]-]+)=([^&;#\s'\"]+)")
# A value is looked for in free text (error messages) only from this length on: shorter ones are not
# credentials, and replacing "1" everywhere would garble the text around it.
MIN_SCRUBBED = 4
# The context keys the mapping sets itself (where the call goes, when, its body, what an MCP message is):
# never a value taken from a secret parameter, so never rewritten, whatever the agent puts in its query.
MAPPED = frozenset(a.name for a in (*ROUTE_CONTEXT, *CALL_TOOL, *MCP_RPC))


@dataclass(frozen=True)
class Redaction:
    secret_query_params: frozenset[str] = field(default=frozenset(DEFAULT_SECRET_QUERY_PARAMS))

    @classmethod
    def of(cls, names: Iterable[str]) -> Redaction:
        return cls(frozenset(n.lower() for n in names))

    def is_secret(self, name: str) -> bool:
        return _ARRAY_SUFFIX.sub("", unquote_plus(name).strip().lower()) in self.secret_query_params

    def query(self, query: str) -> str:
        """The query string with each secret parameter's value replaced; everything else as sent."""
        if not query or not self.secret_query_params:
            return query
        parts = _SEPARATORS.split(query)
        for i in range(0, len(parts), 2):
            name, equals, value = parts[i].partition("=")
            if equals and value and self.is_secret(name):
                parts[i] = f"{name}={REDACTED}"
        return "".join(parts)

    def url(self, url: str) -> str:
        """A request URL as it may be stored or shown: its query redacted."""
        base, question, query = url.partition("?")
        return f"{base}?{self.query(query)}" if question else url

    def values(self, query: str) -> frozenset[str]:
        """The secret parameters' values in `query`, as sent and percent-decoded."""
        found: set[str] = set()
        if not query or not self.secret_query_params:
            return frozenset()
        for part in _SEPARATORS.split(query)[::2]:
            name, equals, value = part.partition("=")
            if equals and value and self.is_secret(name):
                found.update(v for v in (value, unquote_plus(value)) if v)
        return frozenset(found)

    def text(self, text: str, query: str) -> str:
        """Free text (an error message, a problem detail) with the query's secrets cut out: every
        `name=value` of a secret name, and the secret values themselves wherever they appear."""
        return self._text(text, self._scrubbed(query))

    def scrub(self, value: Any, query: str) -> Any:
        """`value` (JSON: strings, lists, dicts) with `text` applied to every string in it."""
        return self._scrub(value, self._scrubbed(query))

    def _scrubbed(self, query: str) -> list[str]:
        # Longest first, so a value containing another is cut out whole.
        return sorted((v for v in self.values(query) if len(v) >= MIN_SCRUBBED), key=len, reverse=True)

    def _text(self, text: str, values: list[str]) -> str:
        for value in values:
            text = text.replace(value, REDACTED)
        if "=" not in text:
            return text
        return _PAIR.sub(lambda m: f"{m[1]}={REDACTED}" if self.is_secret(m[1]) else m[0], text)

    def _scrub(self, value: Any, values: list[str]) -> Any:
        if isinstance(value, str):
            return self._text(value, values)
        if isinstance(value, list):
            return [self._scrub(v, values) for v in value]
        if isinstance(value, dict):
            return {k: self._scrub(v, values) for k, v in value.items()}
        return value

    def context(self, context: dict[str, Any], query: str,
                query_fields: Iterable[tuple[str, str]] | None = None) -> dict[str, Any]:
        """A Cedar context as it may be stored or shown: `query` redacted by name, and the manifest fields
        taken from a secret query parameter replaced, whatever their value.

        `query_fields` (context key, query parameter) says which fields came from the query, as the mapping
        found them (`CedarRequest.query_fields`). Where that is unknown (None), a field is replaced when its
        value is exactly a secret value. Nothing else is touched, never by value: the keys the mapping sets
        itself (`MAPPED`: method, host, path, time, local, body, tool arguments...) stay as decided, so an
        agent cannot make a stored request (replayed, explained, shown to a reviewer) differ from the one
        the live gate decided by putting one of them in a secret parameter."""
        secrets = self.values(query)
        if not secrets:
            return context
        shown = dict(context)
        if isinstance(shown.get("query"), str):
            shown["query"] = self.query(shown["query"])
        if query_fields is None:
            for key, value in context.items():
                if key not in MAPPED and isinstance(value, str) and value in secrets:
                    shown[key] = REDACTED
        else:
            for key, parameter in query_fields:
                if key in shown and key not in MAPPED and self.is_secret(parameter):
                    shown[key] = REDACTED
        return shown
