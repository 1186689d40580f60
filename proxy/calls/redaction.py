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

    def context(self, context: dict[str, Any], query: str) -> dict[str, Any]:
        """A Cedar context as a reviewer may see it: `query` redacted by name, and any value that is
        exactly a secret (a manifest field taken from a secret parameter) replaced."""
        secrets = self.values(query)
        if not secrets:
            return context
        shown = {k: _replace_exact(v, secrets) for k, v in context.items()}
        if isinstance(shown.get("query"), str):
            shown["query"] = self.query(context["query"])
        return shown


def _replace_exact(value: Any, secrets: frozenset[str]) -> Any:
    if isinstance(value, str):
        return REDACTED if value in secrets else value
    if isinstance(value, list):
        return [_replace_exact(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _replace_exact(v, secrets) for k, v in value.items()}
    return value
