"""Calls that a server could read otherwise than the policy saw them: what each is, and why it is refused.

cedargate decides on one reading of a call: its method, path, query, headers and JSON body. Real
servers read some calls otherwise: Symfony, Laravel, Rails and Express run the method that an
`X-HTTP-Method-Override` header or a `_method` parameter names; IIS and older Symfony route by
`X-Original-URL`; Node cuts a target at `#`; Tomcat, Jetty and Spring drop `;parameters` from path
segments; Go's encoding/json and ASP.NET match JSON keys ignoring case and keep the last of
`{"name": .., "NAME": ..}`; servers unfold, split or reject folded and control-laden header lines each
their own way. The mapping (`proxy.calls.mapping`) refuses such a call with the reason given here, so what
the upstream executes is what was decided. Plain functions on plain values, cheap on the common call:
each returns None when nothing is ambiguous, else the reason, saying what to send instead.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from urllib.parse import unquote_plus

from proxy.vocabulary.folds import fold_key

# Never in a request target (RFC 9112 section 3.2, RFC 3986): spaces and control characters (C0, DEL,
# C1; C1 also as raw bytes 0x80-0x9F, which reach us surrogate-escaped), and "#", which starts a fragment.
_NOT_IN_TARGET = re.compile("[\x00-\x20\x7f-\x9f#\udc80-\udc9f]")
# Control characters in a header value; a tab is legal whitespace there (RFC 9110 section 5.5).
_HEADER_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\udc80-\udc9f]")

METHOD_OVERRIDE_HEADERS = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
URL_OVERRIDE_HEADERS = frozenset({"x-original-url", "x-rewrite-url"})
METHOD_PARAMETER = "_method"


def _shown(char: str) -> str:
    if "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8, surrogate-escaped
        return f"the byte 0x{ord(char) - 0xDC00:02X}"
    return "a space" if char == " " else f"the control character U+{ord(char):04X}"


def target_problem(part: str, text: str) -> str | None:
    """Why the path or query (`part` names which) is refused, if it holds what no request target may."""
    found = _NOT_IN_TARGET.search(text)
    if found is None:
        return None
    char = found.group()
    if char == "#":
        return (f"the {part} contains '#', which starts a fragment: clients never send one, and servers cut "
                "the target there (Node routes /mcp#x as /mcp); percent-encode a literal # as %23")
    return (f"the {part} contains {_shown(char)}, which servers reject, strip or split on each their own way "
            "(and terminals act on when a reviewer's view prints it); percent-encode it")


def path_parameter_problem(path: str) -> str | None:
    """Why a path with `;` parameters is refused: servlet containers route it without them."""
    if ";" not in path:
        return None
    routed = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
    return (f"the path has a ';' parameter: Tomcat, Jetty and Spring drop ';...' from each segment before "
            f"routing, so a server may run {routed!r} while the policy decides on the path as sent; send the "
            "path without ';' parameters")


def header_problem(name: str, key: str, value: str) -> str | None:
    """Why a header (`key` is its name lower-cased) is refused, if a server could act on it otherwise."""
    found = _HEADER_CONTROL.search(value)
    if found is not None:
        if found.group() in "\r\n":
            # mitmproxy keeps an obs-fold continuation line inside the value and forwards it folded.
            return (f"the {name} header continues on a folded line (obs-fold, RFC 9112 section 5.2), which "
                    "servers unfold, reject or read as another header; send each header on one line")
        return (f"the {name} header contains {_shown(found.group())}, which servers reject, cut the value at "
                "or keep; send header values without control characters")
    canonical = key.replace("_", "-")  # CGI-style servers (PHP, Rack) read X_HTTP_METHOD as X-HTTP-Method
    if canonical in METHOD_OVERRIDE_HEADERS:
        return (f"the {name} header makes Symfony, Laravel, Express and ASP.NET run another method than the "
                "one decided; send the call with its real method instead")
    if canonical in URL_OVERRIDE_HEADERS:
        return (f"the {name} header makes IIS and Symfony route the call to another path than the one "
                "decided; send the call to its real path instead")
    if key == "host" and "," in value:  # repeated Host headers, joined (no single Host holds a comma)
        return ("the call has more than one Host header, and servers pick different ones (mitmproxy reads "
                "the first); send one Host header")
    return None


def is_method_parameter(name: str) -> bool:
    """Whether a query or form parameter name is read as `_method` by some framework.

    PHP (Symfony, Laravel) ends a name at NUL, drops leading spaces and turns spaces, dots and an open
    '[' into '_'; `_method[]` is still `_method`; ASP.NET reads form fields ignoring case.
    """
    if len(name) < len(METHOD_PARAMETER):
        return False
    name = name.split("\x00", 1)[0].lstrip(" ").replace(" ", "_").replace(".", "_").split("[", 1)[0]
    return len(name) == len(METHOD_PARAMETER) and name.casefold() == METHOD_PARAMETER


# A name is `_method` only if it spells "ethod" or percent-escapes some of it.
_PARAMETER_HINT = re.compile(r"ethod|%", re.I)
_BODY_HINT = re.compile(rb"ethod|%", re.I)
_PAIR_SEPARATOR = re.compile(r"[&;]")  # Rack also splits forms on ";"


def method_parameter(encoded: str) -> str | None:
    """The first parameter of a query or urlencoded form that a framework would read as `_method`."""
    if not _PARAMETER_HINT.search(encoded):
        return None
    for pair in _PAIR_SEPARATOR.split(encoded):
        name = pair.split("=", 1)[0]
        if len(name) < len(METHOD_PARAMETER):  # decoding only shortens a name: cheap to skip
            continue
        if "%" in name or "+" in name:
            name = unquote_plus(name, encoding="latin-1")
        if is_method_parameter(name):
            return name
    return None


def form_method_parameter(body: bytes) -> str | None:
    """`method_parameter` of an urlencoded form body (looked at only when it may hold one)."""
    return method_parameter(body.decode("latin-1")) if _BODY_HINT.search(body) else None


_DISPOSITION = re.compile(rb"(?:^|(?<=\r))[ \t]*content-disposition[^\r\n]*", re.I | re.M)
_DISPOSITION_NAME = re.compile(r"(?:^|[:;\s])name\*?\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^;\s]*)", re.I)


def multipart_method_parameter(body: bytes) -> str | None:
    """A form part of a multipart body that a framework would read as `_method`.

    Every Content-Disposition line is read, not only those after a boundary: parsers find boundaries
    differently, and a part a server finds must not be one cedargate skipped.
    """
    for line in _DISPOSITION.finditer(body):
        for value in _DISPOSITION_NAME.findall(line.group().decode("latin-1")):
            name = re.sub(r"\\(.)", r"\1", value.strip('"'))  # a quoted-string's escapes
            if "'" in name:  # RFC 2231 / 5987: charset'language'percent-encoded
                name = name.rsplit("'", 1)[1]
            if is_method_parameter(unquote_plus(name, encoding="latin-1")):
                return name
    return None


def override_problem(where: str, parameter: str) -> str:
    return (f"the {where} has a {parameter!r} parameter, which makes Symfony, Laravel, Rails and Express run "
            "the method it names instead of the one decided; send the call with its real method instead")


def has_colliding_keys(keys: Collection[str]) -> bool:
    """Whether two keys of one JSON object (already distinct) are one name ignoring case: one set of
    folded keys, the cheap test every object of a body takes."""
    return len({key.lower() if key.isascii() else fold_key(key) for key in keys}) != len(keys)


def colliding_keys(keys: Iterable[str]) -> tuple[str, str] | None:
    """The first two keys of one JSON object (already distinct) that are one name ignoring case."""
    seen: dict[str, str] = {}
    for key in keys:
        first = seen.setdefault(fold_key(key), key)
        if first is not key:
            return first, key
    return None
