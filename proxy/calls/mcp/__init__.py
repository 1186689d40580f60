"""MCP over streamable HTTP: what a JSON-RPC message on an MCP endpoint does, and how to answer for it.

Every MCP call is a POST of JSON-RPC to one URL, so method and path say nothing about what it does. On
an endpoint the action manifest names (`mcp:` under a host), cedargate reads the message instead:

- `tools/call` is `Action::"call_tool"` on `Tool::"<server>/<tool>"` (in `McpServer::"<server>"`), with
  the tool's arguments in `context.arguments` (typed where actions.yaml declares them) and the tool's
  classification in `context.severity` / `context.reversible`;
- every other message (initialize, notifications, tools/list, a response to the server, the GET that
  opens the server's stream, the DELETE that ends a session) is `Action::"mcp_rpc"` on the McpServer,
  with `context.rpc_kind` and `context.rpc_method`.

A JSON-RPC batch is decided message by message. A refusal is answered the way an MCP client can show
it to its model: a tools/call gets a result with `isError: true` and text saying what was denied, why,
and for an escalation the override id and how to retry; another request gets a JSON-RPC error. A
`tools/list` answer is filtered so an agent does not see tools that policy hard-denies to it.

The modules: `jsonrpc` reads the messages of an exchange; `mapping` makes a message a Cedar request;
`binding` is what an override binds to and what a reviewer sees; `refusals` answers for a refused
message; `tools` filters tool lists; `sse` rewrites an event stream; `answers` checks a server's answer.
May import `proxy.vocabulary`, `proxy.cedar` and `proxy.calls.decoding`; nothing above.
"""
