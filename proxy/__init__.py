"""cedargate's core: plain Python on plain data, knowing nothing of mitmproxy or FastAPI.

Packages by concern, each importing only the ones listed before it:

- `vocabulary`: the words every layer shares: the catalogue of refusals, canonical JSON, printable text,
  host names.
- `observe`: what cedargate tells its operators about itself: the Prometheus metrics every layer records.
- `record`: where something is recorded: the decision rows and the tamper-evident audit chain.
- `cedar`: Cedar itself: the context's description, the policy bundle, the action manifest, entities, the
  engine and its slicing.
- `calls`: what an agent's call is: mapping HTTP and MCP to a Cedar request, parsing refusals, tunnels.
- `settings`: cedargate.yaml and the agents' credentials.
- `decision`: where a call gets decided (the gate), and what an upstream failure means for it.
- `oversight`: where an override changes state: opening, voting, holding, releasing, expiring.
- `notify`: telling humans about override requests (webhook, Slack, email), from an outbox read from the
  audit log, by a background job.
- `runtime`: the core composed from settings, the one object both adapters are handed.
- `cli`: the commands, and the composition of the running program: the only place that knows both
  adapters (`addons/` for mitmproxy, `override_api/` for FastAPI).
"""
