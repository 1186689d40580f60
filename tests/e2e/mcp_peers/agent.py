"""A real MCP client ("agent") for cedargate's end-to-end tests.

Runs in its own virtualenv (.venv-mcp, built from requirements.txt beside this
file), like a real agent would, using the official MCP SDK's streamable HTTP
client transport and ClientSession.

    python agent.py --url http://127.0.0.1:N/mcp --steps '<json list>'
                    [--header 'Name: value']... [--timeout SECONDS]
                    [--protocol auto|legacy|modern]

Steps, run in order on one MCP session:
    {"op": "list_tools"}
    {"op": "call_tool", "name": "refund", "arguments": {"order_id": "A1", "amount": 900}}

Output: one JSON line per step on stdout, then {"op": "done"}:
    {"op": "list_tools", "tools": ["search_issues", ...]}
    {"op": "call_tool", "name": ..., "is_error": bool, "text": "<text content joined>",
     "meta": <result _meta or null>, "structured": <structuredContent or null>}
    {"op": ..., "exception": "<type>: <message>"}     a step that raised; the run goes on
Exit status: 0 after "done"; 3 if the session could not be set up or broke (its
last line is then {"op": "session", "exception": ...}, no "done"); 2 on bad usage.
Logs go to stderr only.

--protocol chooses how the session is opened (the SDK 2.x speaks two protocol eras):
    auto    (default; what the SDK's high-level Client does by default) probe
            `server/discover` at the 2026-07-28 revision and fall back to the
            `initialize` handshake if the server does not speak it
    legacy  `initialize` handshake (2025-11-25 revision): Mcp-Session-Id, SSE/JSON
    modern  `server/discover` only (2026-07-28): stateless self-contained POSTs
            carrying Mcp-Method / Mcp-Name headers and a per-request `_meta` envelope

Proxy: the agent goes through the proxy named by the standard environment
variables, exactly as a real agent pointed at a proxy does:
    http:// URLs:  http_proxy / HTTP_PROXY, else all_proxy / ALL_PROXY
    https:// URLs: https_proxy / HTTPS_PROXY, else all_proxy / ALL_PROXY
(lower case wins over upper case, as in urllib/curl), e.g.
HTTP_PROXY=http://ops-bot:secret@127.0.0.1:8080 (credentials are sent as
Proxy-Authorization: Basic). NO_PROXY / no_proxy is deliberately IGNORED: the
agent stands for an agent that is forced through the gate.

What was found about proxy handling (mcp 2.3.0, which uses httpx2 2.16, not httpx):
  * The SDK builds its own client with `httpx2.AsyncClient(timeout=...)` (trust_env
    left True) unless one is passed as `streamable_http_client(url, http_client=...)`.
    (The 1.x `httpx_client_factory=` parameter of `streamablehttp_client` is gone in 2.x.)
  * With trust_env, httpx2 reads HTTP_PROXY/HTTPS_PROXY/ALL_PROXY via urllib's
    getproxies() and has NO built-in bypass for loopback: a 127.0.0.1 URL does go
    through the proxy when NO_PROXY is unset.
  * But any NO_PROXY entry matching the host (127.0.0.1, localhost for a localhost
    URL, or '*') silently sends the request direct. Many environments set
    NO_PROXY=localhost,127.0.0.1, which would let the test agent bypass the gate
    unnoticed.
  * So this script resolves the proxy URL from the environment itself and passes it as
    `httpx2.AsyncClient(proxy=...)`. An explicit proxy= makes httpx2 route all://
    through it and ignore NO_PROXY, while trust_env stays True for SSL_CERT_FILE etc.
The 1.x fallback below does the same with httpx.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from datetime import timedelta
from typing import Any

import anyio

try:  # mcp >= 2 uses httpx2
    import httpx2 as httpx
except ImportError:  # mcp 1.x uses httpx
    import httpx  # type: ignore[no-redef]

from mcp import ClientSession, types

try:  # mcp >= 2 (also present in late 1.x)
    from mcp.client.streamable_http import streamable_http_client as _http_transport
except ImportError:  # older 1.x
    _http_transport = None  # type: ignore[assignment]

try:
    from mcp.client._probe import negotiate_auto as _negotiate_auto  # mcp >= 2
except ImportError:
    _negotiate_auto = None  # type: ignore[assignment]

_SDK_MAJOR = 2 if httpx.__name__ == "httpx2" else 1


def _sdk_timeout(seconds: float) -> Any:
    """The SDK's read_timeout_seconds: a float in 2.x, a timedelta in 1.x."""
    return seconds if _SDK_MAJOR >= 2 else timedelta(seconds=seconds)


# Failures that mean the session/transport itself is gone rather than one call being refused.
_BROKEN = (
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
    httpx.TransportError,
)

HTTP_READ_MARGIN_S = 5.0  # see make_http_client


class SessionBroken(Exception):
    pass


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def describe(exc: BaseException) -> str:
    """'<type>: <message>', looking through exception groups from the SDK's task groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def is_broken(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(is_broken(e) for e in exc.exceptions)
    return isinstance(exc, (_BROKEN, SessionBroken))


def proxy_from_env(url: str) -> str | None:
    """The proxy URL the standard environment variables name for `url`, NO_PROXY ignored."""
    # getproxies_environment() applies the usual lower-over-upper-case precedence
    # (and ignores HTTP_PROXY under CGI's REQUEST_METHOD, as urllib does).
    proxies = urllib.request.getproxies_environment()
    proxies.pop("no", None)
    scheme = url.split("://", 1)[0].lower()
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy
    return proxy or None


def parse_headers(values: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, sep, val = value.partition(":")
        if not sep or not name.strip():
            print(f"agent.py: bad --header {value!r}, expected 'Name: value'", file=sys.stderr)
            raise SystemExit(2)
        headers[name.strip()] = val.strip()
    return headers


def make_http_client(url: str, headers: dict[str, str], timeout: float) -> Any:
    proxy = proxy_from_env(url)
    # Connect/write/pool: 30 s like the SDK's default. Read: --timeout (a gate may hold
    # a call open for tens of seconds while a human reviews it) plus a small margin, so
    # that the session's own per-request timeout (exactly --timeout) fires first: then a
    # call that takes too long is reported as that step's exception ("Request
    # 'tools/call' timed out") and, on the 2026-07-28 wire, its POST is aborted and the
    # run goes on. If the HTTP read timeout fired first, the SDK (2.3.0) lets httpx's
    # ReadTimeout escape its transport task group, which ends the whole session; that
    # still happens on the legacy wire, where an abandoned POST stays open (exit 3).
    kwargs: dict[str, Any] = {
        "headers": headers,
        "timeout": httpx.Timeout(30.0, read=timeout + HTTP_READ_MARGIN_S),
    }
    if proxy:
        kwargs["proxy"] = proxy
    print(f"agent.py: proxy={proxy or 'none (direct)'}", file=sys.stderr, flush=True)
    return httpx.AsyncClient(**kwargs)


def _open_transport(url: str, http_client: Any) -> Any:
    if _http_transport is not None:
        return _http_transport(url, http_client=http_client)
    from mcp.client.streamable_http import streamablehttp_client  # type: ignore[attr-defined]

    def factory(headers=None, timeout=None, auth=None):  # noqa: ANN001 - 1.x McpHttpClientFactory signature
        return http_client

    return streamablehttp_client(url, httpx_client_factory=factory)


async def open_session(session: ClientSession, protocol: str) -> str:
    if protocol == "legacy" or (protocol == "auto" and _negotiate_auto is None):
        result = await session.initialize()
        return str(getattr(result, "protocol_version", None) or getattr(result, "protocolVersion", ""))
    if protocol == "modern":
        await session.discover()
    else:
        await _negotiate_auto(session)
    return str(session.protocol_version)


def result_dump(result: Any) -> dict[str, Any]:
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


async def run_step(session: ClientSession, step: dict[str, Any], timeout: float) -> dict[str, Any]:
    op = step.get("op")
    if op == "list_tools":
        tools: list[str] = []
        cursor = None
        for _ in range(100):  # bounded pagination
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            result = await (session.list_tools(params=params) if params else session.list_tools())
            tools.extend(t.name for t in result.tools)
            cursor = getattr(result, "next_cursor", None) or getattr(result, "nextCursor", None)
            if not cursor:
                break
        return {"op": "list_tools", "tools": tools}
    if op == "call_tool":
        name = step["name"]
        result = await session.call_tool(
            name, step.get("arguments") or {}, read_timeout_seconds=_sdk_timeout(timeout)
        )
        data = result_dump(result)
        texts = [c.get("text", "") for c in data.get("content", []) if c.get("type") == "text"]
        return {
            "op": "call_tool",
            "name": name,
            "is_error": bool(data.get("isError", False)),
            "text": "\n".join(texts),
            "meta": data.get("_meta"),
            "structured": data.get("structuredContent"),
        }
    raise ValueError(f"unknown op {op!r}")


async def run(args: argparse.Namespace, steps: list[dict[str, Any]], headers: dict[str, str]) -> int:
    http_client = make_http_client(args.url, headers, args.timeout)
    async with http_client:
        async with _open_transport(args.url, http_client) as streams:
            read_stream, write_stream = streams[0], streams[1]  # 1.x yields a third item
            async with ClientSession(
                read_stream, write_stream, read_timeout_seconds=_sdk_timeout(args.timeout)
            ) as session:
                try:
                    with anyio.fail_after(args.timeout + 30):
                        version = await open_session(session, args.protocol)
                except Exception as exc:  # noqa: BLE001
                    raise SessionBroken(f"could not open the MCP session: {describe(exc)}") from exc
                print(f"agent.py: session open, protocol {version}", file=sys.stderr, flush=True)
                for step in steps:
                    op = step.get("op") if isinstance(step, dict) else None
                    try:
                        # Bounded: the SDK's read timeout applies per request; this is a backstop.
                        with anyio.fail_after(args.timeout + 30):
                            emit(await run_step(session, step, args.timeout))
                    except Exception as exc:  # noqa: BLE001 - a denied call must not end the run
                        emit({"op": op, "exception": describe(exc)})
                        if is_broken(exc):
                            raise SessionBroken(describe(exc)) from exc
                emit({"op": "done"})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="MCP streamable-HTTP test agent (see module docstring)")
    p.add_argument("--url", required=True, help="MCP endpoint, e.g. http://127.0.0.1:8000/mcp")
    p.add_argument("--steps", required=True, help="JSON list of steps")
    p.add_argument("--header", action="append", default=[], help="'Name: value', sent on every request; repeatable")
    p.add_argument("--timeout", type=float, default=60.0, help="HTTP read / per-request timeout in seconds (60)")
    p.add_argument("--protocol", choices=("auto", "legacy", "modern"), default="auto")
    args = p.parse_args(argv)
    try:
        steps = json.loads(args.steps)
        if not isinstance(steps, list):
            raise ValueError("steps must be a JSON list")
    except ValueError as exc:
        p.error(f"--steps: {exc}")
    headers = parse_headers(args.header)
    try:
        return anyio.run(run, args, steps, headers)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - includes exception groups from the transport
        emit({"op": "session", "exception": describe(exc)})
        return 3


if __name__ == "__main__":
    sys.exit(main())
