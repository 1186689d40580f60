"""The action manifest: what a call *does*, in the operator's words, instead of a method and a path.

`policies/actions.yaml` maps calls on a host to named Cedar actions:

    hosts:
      - host: api.payments.example            # exact, or a glob: "*.payments.example"
        unknown: refuse                       # a call matching no route: refuse (default) or http
        routes:
          - route: POST /v1/refunds/{order_id}
            action: process_refund
            severity: high                    # classification, shown to policies as context
            reversible: false
            fields:
              order_id: {from: path, type: String}
              amount:   {from: body, at: amount, type: Decimal}
              currency: {from: body, at: currency, type: String, required: false}

A route's fields become typed Cedar context (`context.amount > decimal("500.0")`), and its
classification `context.severity` and `context.reversible`. On a host that has a manifest, a call that
matches no route is an *unknown action* and is refused, because nobody has classified its risk, unless
the host says `unknown: http`. `schema_text` writes the Cedar schema of the manifest's actions so that
policies are validated against exactly the context the proxy sends. Errors name file, entry and field.

The package, by concern: `spec` (what actions.yaml may say, as models), `loading` (reading and checking
the file), `routes` (the compiled matcher), `fields` (a matched route's fields as typed Cedar values),
`schema` (the Cedar schema of the manifest's actions). Its public names are re-exported here.
May import `proxy.vocabulary` and `proxy.cedar.context`.
"""

from __future__ import annotations

from proxy.cedar.manifest.fields import extract_fields, typed_value
from proxy.cedar.manifest.loading import load_manifest
from proxy.cedar.manifest.routes import AMBIGUOUS, Manifest, RouteMatch
from proxy.cedar.manifest.schema import schema_text
from proxy.cedar.manifest.spec import (
    FIELD_TYPES,
    MANIFEST_FILE,
    MANIFEST_SCHEMA_FILE,
    MCP_ACTIONS,
    TOOL_NAME,
    FieldError,
    FieldSpec,
    HostSpec,
    ManifestError,
    ManifestSpec,
    McpEndpointSpec,
    RouteSpec,
    ToolSpec,
)

__all__ = [
    "AMBIGUOUS", "FIELD_TYPES", "MANIFEST_FILE", "MANIFEST_SCHEMA_FILE", "MCP_ACTIONS", "TOOL_NAME", "FieldError",
    "FieldSpec", "HostSpec", "Manifest", "ManifestError", "ManifestSpec", "McpEndpointSpec", "RouteMatch", "RouteSpec",
    "ToolSpec", "extract_fields", "load_manifest", "schema_text", "typed_value",
]
