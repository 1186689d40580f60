// The review page: sign-in, the inbox, one request, history. Plain script, no build step, no dependency.
//
// Everything an agent controls (URLs, headers, bodies, arguments, justifications, answers) reaches the
// page as data and is put in as text nodes (through `el`), never as markup: nothing here parses HTML.
// Changes are sent with the session cookie and the session's CSRF token (X-CSRF-Token).
"use strict";

const UNDECIDED = ["pending", "needs_info"];
const POLL_MS = 3000;
let csrfToken = "";

// --- building the page ------------------------------------------------------------------------------

// An element with properties (className, href, title, hidden, dataset...) and children: strings become
// text nodes, so nothing given here is ever parsed as HTML.
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "href") node.setAttribute("href", safeHref(value));
    else node[key] = value;
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Links go only to this page's own paths: an id with odd characters is encoded, never a scheme.
function safeHref(path) {
  return typeof path === "string" && path.startsWith("/") && !path.startsWith("//") ? path : "#";
}

function requestHref(id) {
  return "/inbox/requests/" + encodeURIComponent(id);
}

function fill(container, ...children) {
  container.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
}

function $(selector) {
  return document.querySelector(selector);
}

// --- the API ----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken;
  const response = await fetch(path, {
    method, headers, credentials: "same-origin", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401 && document.body.dataset.page !== "sign-in") toSignIn();
    throw new ApiError(response.status, (data && data.detail) || response.statusText);
  }
  return data;
}

// The same, for a route another part of cedargate may not serve yet: null when it is not there.
async function optional(path) {
  try {
    return await api("GET", path);
  } catch (error) {
    if (error.status === 404 || error.status === 405) return null;
    throw error;
  }
}

// A listing's requests, whether the API answers with a list or with a page of them ({items: [...]}).
function listed(answer) {
  return Array.isArray(answer) ? answer : (answer && answer.items) || [];
}

function toSignIn() {
  const next = location.pathname + location.search;
  location.assign("/inbox/sign-in?next=" + encodeURIComponent(next));
}

async function session() {
  const current = await api("GET", "/session");
  csrfToken = current.csrf_token;
  return current;
}

function header(current) {
  const bar = $("#bar");
  if (!bar) return;
  const signOut = el("button", { type: "button", id: "sign-out", className: "link" }, "Sign out");
  signOut.addEventListener("click", async () => {
    await api("DELETE", "/session").catch(() => null);
    location.assign("/inbox/sign-in");
  });
  fill(bar,
    el("span", { className: "brand" }, "cedargate · review"),
    el("nav", {},
      el("a", { href: "/inbox" }, "Inbox"),
      el("a", { href: "/inbox/history" }, "History"),
      current.auditor ? el("a", { href: "/inbox/report" }, "Report") : null,
      el("a", { href: "/docs" }, "API docs")),
    el("span", { className: "who" },
      el("span", { id: "approver" }, current.approver),
      el("span", { className: "roles" }, " (" + current.roles.join(", ") + ")"),
      signOut));
}

// --- shared pieces of a request -----------------------------------------------------------------------

// The tool's name whether the list gives it as a name (its summary) or as {server, name, arguments}.
function toolName(o) {
  if (!o.tool) return null;
  return typeof o.tool === "string" ? o.tool : o.tool.name;
}

function whatItDoes(o) {
  const tool = toolName(o);
  if (tool) return tool;
  const action = String(o.action || "").replace(/^Action::"(.*)"$/, "$1");
  return action || o.method;
}

function target(o) {
  try {
    const url = new URL(o.url);
    return url.host + url.pathname;
  } catch (error) {
    return o.url || o.resource || "";
  }
}

function shortValue(value) {
  if (value && typeof value === "object" && value.__extn) return String(value.__extn.arg);
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text.length > 80 ? text.slice(0, 79) + "…" : text;
}

// What every call's context has: not the call's own values (those are manifest fields).
const CONTEXT_PLUMBING = new Set(["scheme", "host", "port", "method", "path", "query", "headers", "agent", "body",
  "severity", "reversible", "server", "rpc_kind", "rpc_method", "tool", "arguments", "uri", "prompt"]);

function keyArguments(o) {
  let args = o.key_arguments;
  if (!args && o.tool && typeof o.tool === "object") args = o.tool.arguments;
  if (!args && o.cedar_request && o.cedar_request.context) {
    args = Object.fromEntries(Object.entries(o.cedar_request.context).filter(([name]) => !CONTEXT_PLUMBING.has(name)));
  }
  if (!args || typeof args !== "object") return [];
  return Object.entries(args).slice(0, 6).map(([name, value]) =>
    el("span", { className: "arg" }, el("span", { className: "arg-name" }, name + ": "), shortValue(value)));
}

function classification(o) {
  const context = (o.cedar_request && o.cedar_request.context) || {};
  const severity = o.severity || context.severity || null;
  const reversible = o.reversible !== undefined && o.reversible !== null ? o.reversible : context.reversible;
  const badges = [];
  if (severity) badges.push(el("span", { className: "badge severity-" + severity.replace(/[^a-z]/g, "") }, severity));
  if (reversible === false || reversible === "false") badges.push(el("span", { className: "badge irreversible" }, "irreversible"));
  return badges;
}

// The moment a request expires, on this browser's clock: from the server's seconds_left when it gives it
// (so a skewed clock does not matter), else from expires_at.
function deadline(o, fetchedAt) {
  if (typeof o.seconds_left === "number") return fetchedAt + o.seconds_left * 1000;
  return Date.parse(o.expires_at);
}

function timeLeft(until) {
  const seconds = Math.round((until - Date.now()) / 1000);
  if (seconds <= 0) return "expiring";
  if (seconds < 60) return seconds + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + String(seconds % 60).padStart(2, "0") + " s";
  return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
}

function tickTimers() {
  for (const node of document.querySelectorAll("[data-deadline]")) {
    const until = Number(node.dataset.deadline);
    node.textContent = timeLeft(until);
    node.classList.toggle("urgent", until - Date.now() < 5 * 60 * 1000);
  }
}

function votesText(o) {
  const votes = o.votes || [];
  if (!votes.length) return "none yet";
  return votes.map((v) => v.approver + " " + (v.verdict === "approve" ? "✓" : "✗")).join(", ");
}

function rolesNeeded(o) {
  if (Array.isArray(o.roles_needed)) return o.roles_needed.join(", ") || "—";
  const voted = new Set((o.votes || []).filter((v) => v.verdict === "approve").flatMap((v) => v.roles || []));
  const roles = [...new Set((o.requirements || []).flatMap((r) => r.roles || []))].filter((r) => !voted.has(r));
  return roles.length ? roles.join(", ") : "—";
}

// Where a request stands in its escalation chain, for the inbox row: "tier 2 of 3", the next step with a
// ticking countdown, and the primary reviewer. A one-tier request with nobody named shows nothing.
function chainCell(o) {
  const chain = o.chain;
  if (!chain || !UNDECIDED.includes(o.status)) return null;
  const parts = [];
  if (chain.tier_count > 1) {
    parts.push(el("span", { className: "badge tier" }, "tier " + chain.tier + " of " + chain.tier_count));
    if (chain.next_step && chain.next_step_at) {
      const until = Date.parse(chain.next_step_at);
      parts.push(el("span", { className: "next-step" }, " " + chain.next_step + " in ",
        el("span", { className: "time-left", dataset: { deadline: String(until) } }, timeLeft(until))));
    }
  }
  if (chain.primary_reviewer) {
    parts.push(el("div", { className: "primary" }, "primary: ", el("strong", {}, chain.primary_reviewer)));
  }
  return parts;
}

// The whole chain on a request's page: each tier with its roles and when it is reached, the current one
// marked, the next step, the reminders and the primary reviewer.
function renderChain(o) {
  const chain = o.chain;
  const target = $("#chain .content");
  if (!target) return;
  if (!chain) {
    fill(target, el("p", { className: "hint" }, "No escalation chain."));
    return;
  }
  const undecided = UNDECIDED.includes(o.status);
  const tiers = el("ol", { className: "chain" }, (chain.tiers || []).map((tier) => el("li", {
      className: "chain-tier" + (tier.reached ? " reached" : "") + (undecided && tier.tier === chain.tier ? " current" : ""),
      dataset: { tier: String(tier.tier) } },
    el("span", { className: "tier-name" }, "Tier " + tier.tier), " ",
    el("span", { className: "tier-roles" }, (tier.roles || []).join(", ")),
    el("div", { className: "hint" },
      (tier.after_seconds ? "from " + when(tier.at) : "from the opening")
      + (tier.reached ? " · reached" : " · not yet")
      + (undecided && tier.tier === chain.tier ? " · current" : "")))));
  const pairs = [];
  if (undecided && chain.next_step && chain.next_step_at) {
    const until = Date.parse(chain.next_step_at);
    pairs.push(["Next step", el("span", { id: "next-step" }, chain.next_step + " at " + when(chain.next_step_at) + " (in ",
      el("span", { className: "time-left", dataset: { deadline: String(until) } }, timeLeft(until)), ")")]);
  }
  if (chain.remind_every) pairs.push(["Reminders", "every " + chain.remind_every + " s"]);
  if (undecided) pairs.push(["Primary reviewer", el("span", { id: "primary-reviewer" }, chain.primary_reviewer || "none named")]);
  fill(target, tiers, definitionList(pairs),
    undecided && chain.next_step === "expiry"
      ? el("p", { className: "hint" }, "Undecided at its expiry, the request is rejected and the agent is told.")
      : null);
}

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return isNaN(date) ? String(iso) : date.toLocaleString();
}

function showError(error) {
  const target = $("#error");
  if (target) target.textContent = error.message || String(error);
}

// --- sign-in ----------------------------------------------------------------------------------------

function signInPage() {
  $("#sign-in").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("#sign-in-error").textContent = "";
    try {
      await api("POST", "/session", { token: $("#token").value });
      const next = new URLSearchParams(location.search).get("next") || "/inbox";
      location.assign(next.startsWith("/inbox") ? next : "/inbox");
    } catch (error) {
      $("#sign-in-error").textContent = error.message;
    }
  });
}

// --- the inbox ----------------------------------------------------------------------------------------

async function inboxPage() {
  header(await session());
  const refresh = async () => {
    try {
      const fetchedAt = Date.now();
      const found = listed(await api("GET", "/overrides?decided=false&limit=500"));
      const waiting = await withDetails(found.filter((o) => UNDECIDED.includes(o.status)));
      waiting.forEach((o) => { o._deadline = deadline(o, fetchedAt); });
      waiting.sort((a, b) => a._deadline - b._deadline);
      renderInbox(waiting);
      $("#error").textContent = "";
      $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      showError(error);
    }
  };
  await refresh();
  setInterval(refresh, POLL_MS);
  setInterval(tickTimers, 1000);
}

// A listing that lacks the summary's at-a-glance fields (an API without them) is completed from each
// request's own view, so the inbox still shows tool, arguments, risk, votes and roles.
async function withDetails(requests) {
  if (!requests.length || "roles_needed" in requests[0]) return requests;
  return Promise.all(requests.slice(0, 100).map((o) =>
    api("GET", "/overrides/" + encodeURIComponent(o.id)).then((whole) => ({ ...whole, ...o, tool: whole.tool }))
      .catch(() => o)));
}

function renderInbox(waiting) {
  $("#count").textContent = waiting.length ? String(waiting.length) : "";
  $("#empty").hidden = waiting.length > 0;
  fill($("#requests tbody"), waiting.map((o) => {
    const row = el("tr", { className: "request-row" + (o.status === "needs_info" ? " needs-info" : ""),
                           dataset: { id: o.id } },
      el("td", {}, el("span", { className: "time-left", dataset: { deadline: String(o._deadline) } },
                      timeLeft(o._deadline)),
         o.status === "needs_info" ? el("span", { className: "badge asked" }, "asked the agent") : null),
      el("td", { className: "agent" }, o.agent),
      el("td", { className: "what" }, el("a", { href: requestHref(o.id) }, whatItDoes(o))),
      el("td", { className: "target" }, el("span", { className: "method" }, o.method), " ", target(o)),
      el("td", { className: "args" }, keyArguments(o)),
      el("td", { className: "risk" }, classification(o)),
      el("td", { className: "votes" }, votesText(o)),
      el("td", { className: "roles" }, rolesNeeded(o)),
      el("td", { className: "chain-cell" }, chainCell(o)));
    row.addEventListener("click", (event) => {
      if (event.target.tagName !== "A") location.assign(requestHref(o.id));
    });
    return row;
  }));
  tickTimers();
}

// --- one request ----------------------------------------------------------------------------------------

function requestId() {
  return decodeURIComponent(location.pathname.split("/").pop());
}

async function requestPage() {
  header(await session());
  const id = requestId();
  let shown = null;
  const refresh = async () => {
    try {
      const fetchedAt = Date.now();
      shown = await api("GET", "/overrides/" + encodeURIComponent(id));
      renderRequest(shown, fetchedAt);
      $("#error").textContent = "";
    } catch (error) {
      showError(error);
    }
  };
  await refresh();
  if (shown) {
    renderChangeFields(shown);
    renderContext(id).catch(showError);
    renderAudit(id).catch(showError);
  }
  wireDecisions(id, async () => { await refresh(); renderAudit(id).catch(showError); });
  setInterval(refresh, POLL_MS);
  setInterval(tickTimers, 1000);
}

function definitionList(pairs) {
  return el("dl", {}, pairs.filter(([, value]) => value !== undefined && value !== null && value !== "")
    .map(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
}

function renderRequest(o, fetchedAt) {
  document.title = whatItDoes(o) + " · cedargate review";
  const undecided = UNDECIDED.includes(o.status);
  fill($("#summary"),
    el("h1", {}, el("span", { id: "what" }, whatItDoes(o)), " ",
       el("span", { className: "status status-" + o.status, id: "status" }, o.status.replace("_", " "))),
    el("p", { className: "lead" },
      el("span", { className: "agent" }, o.agent), " wants to ",
      el("span", { className: "method" }, o.method), " ", el("span", { className: "target" }, target(o)), " ",
      classification(o),
      undecided ? [" · ", el("span", { className: "time-left", dataset: { deadline: String(deadline(o, fetchedAt)) } },
                             timeLeft(deadline(o, fetchedAt))), " left"] : null));

  const policies = (o.policies || []).map((p) => el("div", { className: "policy" },
    el("code", { className: "policy-id" }, "@id(\"" + p.id + "\")"),
    p.reason ? el("p", { className: "policy-reason" }, p.reason) : null));
  const requirements = (o.requirements || []).map((r) => el("li", {},
    (r.approvals || 1) + " approval(s) from " + (r.roles || []).join(" + ") + " (policy " + r.policy_id + ")"));
  fill($("#why .content"),
    el("p", {}, "A forbid policy that a human may lift matched this call, so it was held for a decision."),
    policies,
    requirements.length ? el("ul", {}, requirements) : null,
    definitionList([["Policy revision", el("code", {}, String(o.policy_revision || "").slice(0, 12))],
                    ["Decision id", el("code", {}, o.decision_id)],
                    ["Opened", when(o.created_at)], ["Expires", when(o.expires_at)]]));

  fill($("#call .content"), renderCall(o));

  const context = (o.cedar_request && o.cedar_request.context) || {};
  const told = context.agent || {};
  fill($("#agent .content"), definitionList([
    ["Agent", o.agent],
    ["Justification", o.justification || told.justification || el("em", {}, "none given")],
    ["Confidence", told.confidence !== undefined ? shortValue(told.confidence) : el("em", {}, "not stated")],
    ["Session", told.session || el("em", {}, "not stated")],
  ]));

  const conversation = o.conversation || [];
  fill($("#conversation .content"), conversation.length
    ? el("ol", { className: "conversation" }, conversation.map((turn) => el("li", { className: "turn " + turn.kind },
        el("span", { className: "turn-by" }, (turn.kind === "question" ? "Question from " : "Answer from ") + turn.by),
        el("span", { className: "turn-at" }, when(turn.at)),
        el("p", { className: "turn-text" }, turn.text))))
    : el("p", { className: "hint" }, "No questions asked yet."));

  fill($("#votes .content"), (o.votes || []).length
    ? el("ul", { className: "vote-list" }, o.votes.map((v) => el("li", {},
        el("strong", {}, v.approver), " ", v.verdict === "approve" ? "approved" : "denied", ": ",
        el("span", { className: "vote-reason" }, v.reason), el("span", { className: "hint" }, " " + when(v.at)))))
    : el("p", { className: "hint" }, "No votes yet."),
    el("p", {}, "Roles still needed: " + rolesNeeded(o)));

  renderChain(o);

  $("#decision").hidden = !undecided;
  const decided = $("#decided");
  decided.hidden = undecided;
  if (!undecided) {
    decided.textContent = "This request is " + o.status.replace("_", " ")
      + (o.decided_reason ? ": " + o.decided_reason : "") + (o.decided_at ? " (" + when(o.decided_at) + ")" : "");
  }
}

function prettyBody(o) {
  const body = o.body || "";
  try {
    return JSON.stringify(JSON.parse(body), null, 2);
  } catch (error) {
    return body;
  }
}

function renderCall(o) {
  const headers = Object.entries(o.headers || {});
  const tool = o.tool_call || (o.tool && typeof o.tool === "object" ? o.tool : null);
  const parts = [
    el("p", { className: "request-line" }, el("span", { className: "method" }, o.method), " ",
       el("code", { className: "url" }, o.url)),
  ];
  if (tool) {
    parts.push(el("h3", {}, "MCP tool"),
      definitionList([["Server", tool.server], ["Tool", el("code", { id: "tool-name" }, tool.name)]]),
      el("table", { className: "arguments" }, el("tbody", {}, Object.entries(tool.arguments || {}).map(([k, v]) =>
        el("tr", {}, el("th", {}, k), el("td", {}, el("code", {}, typeof v === "string" ? v : JSON.stringify(v))))))));
  }
  parts.push(el("h3", {}, "Headers"),
    headers.length ? el("table", { className: "headers" }, el("tbody", {}, headers.map(([k, v]) =>
      el("tr", {}, el("th", {}, k), el("td", {}, el("code", {}, v)))))) : el("p", { className: "hint" }, "none"),
    el("h3", {}, "Body"),
    o.body ? el("pre", { className: "body", id: "body" }, prettyBody(o)) : el("p", { className: "hint" }, "empty"));
  if (o.changes && Object.keys(o.changes).length) {
    parts.push(el("h3", {}, "Changed by the reviewer"), definitionList(Object.entries(o.changes).map(([k, v]) =>
      [k, shortValue(v)])));
  }
  return parts;
}

async function renderContext(id) {
  const context = await optional("/overrides/" + encodeURIComponent(id) + "/context");
  if (context === null) {
    fill($("#recent .content"), el("p", { className: "hint" }, "Not available from this server."));
    fill($("#similar .content"), el("p", { className: "hint" }, "Not available from this server."));
    return;
  }
  const recent = context.recent_calls || {};
  const calls = Array.isArray(recent) ? recent : recent.calls || [];
  fill($("#recent .content"),
    el("p", { className: "hint" }, recent.scope === "session" ? "This agent's last calls in session " + recent.session
      : "The agent stated no session: its last calls."),
    calls.length ? rowsTable(calls, ["at", "method", "host", "path", "tool", "decision", "upstream_status"],
                             (call) => call.this_request ? "this-request" : "")
      : el("p", { className: "hint" }, "No other calls."));
  const similar = context.similar || {};
  const requests = Array.isArray(similar) ? similar : similar.requests || [];
  const tally = Object.entries(similar.outcomes || {}).map(([status, count]) => count + " " + status.replace("_", " "));
  fill($("#similar .content"),
    tally.length ? el("p", { id: "similar-outcomes" }, "Decided before under the same policy: " + tally.join(", ")) : null,
    requests.length
      ? el("ul", { className: "similar" }, requests.map((r) => el("li", {},
          el("a", { href: requestHref(r.id) }, r.agent || r.id), " ",
          el("span", { className: "status status-" + r.status }, String(r.status || "").replace("_", " ")), " ",
          keyArguments(r),
          r.decided_reason ? el("span", { className: "similar-reason" }, " " + r.decided_reason) : null,
          el("span", { className: "hint" }, " " + when(r.decided_at || r.created_at)))))
      : el("p", { className: "hint" }, "No similar request was decided before."));
  const policy = context.policy || {};
  const gone = (policy.policies || []).filter((p) => p.in_live_revision === false).map((p) => p.id);
  if (policy.is_live === false) {
    $("#revision-warning").textContent = "The policies have changed since this call was held (live revision "
      + String(policy.live_revision || "").slice(0, 12) + ")"
      + (gone.length ? ": " + gone.join(", ") + " no longer in force." : "; its release is decided by the live ones.");
    $("#revision-warning").hidden = false;
  }
}

// A table of plain rows, with the columns among `preferred` that any row has (values as text).
function rowsTable(rows, preferred, rowClass) {
  const columns = preferred.filter((c) => rows.some((r) => r[c] !== undefined && r[c] !== null));
  const cell = (r, c) => {
    const value = r[c];
    if (value === undefined || value === null) return "";
    if (c === "at") return when(value);
    if (c === "hash") return String(value).slice(0, 12);
    return shortValue(value);
  };
  return el("table", { className: "rows" },
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c.replace("_", " "))))),
    el("tbody", {}, rows.map((r) => el("tr", { className: rowClass ? rowClass(r) : "" },
      columns.map((c) => el("td", { className: "col-" + c }, cell(r, c)))))));
}

async function renderAudit(id) {
  const rows = await optional("/overrides/" + encodeURIComponent(id) + "/audit");
  if (rows === null) {
    fill($("#audit .content"), el("p", { className: "hint" }, "Not available from this server."));
    return;
  }
  const list = Array.isArray(rows) ? rows : rows.rows || rows.events || [];
  fill($("#audit .content"), list.length ? rowsTable(list, ["seq", "at", "kind", "actor", "decision_id", "hash"])
    : el("p", { className: "hint" }, "No audit rows."));
}

// Approve with changes: a typed input for each field the reviewer may change (`editable_fields`).
function renderChangeFields(o) {
  const fields = o.editable_fields || [];
  const container = $("#changes");
  if (!Array.isArray(fields) || !fields.length) return;
  container.append(el("h3", {}, "Change before approving"));
  for (const field of fields) {
    const name = field.name || field.field;
    const type = String(field.type || "String");
    const numeric = /^(long|decimal|integer|number|int|float)$/i.test(type);
    const boolean = /^bool/i.test(type);
    const input = el("input", {
      id: "change-" + name, name, className: "change-field",
      type: boolean ? "checkbox" : numeric ? "number" : "text",
      step: numeric && !/long|int/i.test(type) ? "any" : undefined,
    });
    input.dataset.type = type;
    input.dataset.original = JSON.stringify(field.value === undefined ? null : field.value);
    if (boolean) input.checked = field.value === true;
    else if (field.value !== undefined && field.value !== null) input.value = shortValue(field.value);
    container.append(el("label", { htmlFor: "change-" + name }, name + " (" + type + ")"), input);
  }
  $("#approve-changes").hidden = false;
}

// The number the reviewer typed. A number input the browser cannot read (cleared, or a lone "-") has the
// value "", which Number reads as 0, and parseInt reads "1e3" as 1: neither may become a change nobody typed.
function typedNumber(input, whole) {
  const value = input.value.trim() === "" || !input.validity.valid ? NaN : Number(input.value);
  if (!Number.isFinite(value) || (whole && !Number.isSafeInteger(value))) {
    throw new Error(input.name + ": not a number" + (whole ? " (a whole number)" : "") + "; type it again");
  }
  return value;
}

function changedFields() {
  const changes = {};
  for (const input of document.querySelectorAll(".change-field")) {
    const type = input.dataset.type;
    let value;
    if (input.type === "checkbox") value = input.checked;
    else if (/long|int/i.test(type)) value = typedNumber(input, true);
    // A Decimal is sent as a JSON number, as the call's own body has it.
    else if (/decimal|number|float/i.test(type)) value = typedNumber(input, false);
    else value = input.value;
    const original = JSON.parse(input.dataset.original);
    if (JSON.stringify(value) !== JSON.stringify(original) && String(value) !== shortValue(original)) {
      changes[input.name] = value;
    }
  }
  return changes;
}

function wireDecisions(id, refresh) {
  const result = $("#decide-result");
  const path = (verb) => "/overrides/" + encodeURIComponent(id) + "/" + verb;
  const run = async (label, send) => {
    result.textContent = "";
    result.className = "result";
    for (const button of document.querySelectorAll("#decision button")) button.disabled = true;
    try {
      const after = await send();
      result.textContent = label + " — the request is now " + String(after && after.status || "updated").replace("_", " ") + ".";
      result.classList.add("ok");
      await refresh();
    } catch (error) {
      result.textContent = error.message;
      result.classList.add("error");
    } finally {
      for (const button of document.querySelectorAll("#decision button")) button.disabled = false;
    }
  };
  const reason = () => $("#reason").value.trim();
  $("#approve").addEventListener("click", () => run("Approved",
    () => api("POST", path("approve"), { reason: reason() || "approved on the review page" })));
  $("#approve-changes").addEventListener("click", () => {
    let changes;
    try {
      changes = changedFields();
    } catch (error) {
      result.textContent = error.message;
      result.className = "result error";
      return;
    }
    if (!Object.keys(changes).length) {
      result.textContent = "Change a value first, or use Approve.";
      result.className = "result error";
      return;
    }
    run("Approved with changes", () => api("POST", path("approve"),
      { reason: reason() || "approved with changes on the review page", changes }));
  });
  $("#deny").addEventListener("click", () => {
    if (!reason()) {
      result.textContent = "Say why you deny it: the agent is told your reason.";
      result.className = "result error";
      $("#reason").focus();
      return;
    }
    run("Denied", () => api("POST", path("deny"), { reason: reason() }));
  });
  $("#ask").addEventListener("click", () => {
    const question = $("#question").value.trim();
    if (!question) {
      result.textContent = "Write the question the agent should answer.";
      result.className = "result error";
      $("#question").focus();
      return;
    }
    run("Asked the agent", async () => {
      const after = await api("POST", path("request-info"), { question });
      $("#question").value = "";
      return after;
    });
  });
}

// --- history --------------------------------------------------------------------------------------------

async function historyPage() {
  header(await session());
  const form = $("#filters");
  const params = new URLSearchParams(location.search);
  for (const name of ["status", "agent", "action", "policy"]) {
    if (params.get(name)) form.elements[name].value = params.get(name);
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const chosen = new URLSearchParams();
    for (const name of ["status", "agent", "action", "policy"]) {
      const value = form.elements[name].value.trim();
      if (value) chosen.set(name, value);
    }
    history.replaceState(null, "", "/inbox/history" + (chosen.toString() ? "?" + chosen : ""));
    loadHistory(chosen).catch(showError);
  });
  await loadHistory(params).catch(showError);
}

async function loadHistory(filters) {
  const query = new URLSearchParams({ decided: "true", limit: "200" });
  for (const [name, value] of filters) if (["status", "agent", "action", "policy"].includes(name)) query.set(name, value);
  const found = listed(await api("GET", "/overrides?" + query));
  // Only what a human decided (or that ran out): a server without the `decided` filter lists all.
  let decided = found.filter((o) => !UNDECIDED.includes(o.status));
  // What an approval changed is on the request's own view, not in the listing: read approved ones whole
  // (and every one, from a server whose listing lacks who decided and why).
  const approved = ["granted", "released", "release_refused", "grant_expired"];
  decided = await Promise.all(decided.map((o) => (o.votes && "decided_reason" in o && !approved.includes(o.status))
    ? o : api("GET", "/overrides/" + encodeURIComponent(o.id)).catch(() => o)));
  decided.sort((a, b) => Date.parse(b.decided_at || b.created_at) - Date.parse(a.decided_at || a.created_at));
  $("#empty").hidden = decided.length > 0;
  fill($("#history tbody"), decided.map((o) => el("tr", { className: "history-row", dataset: { id: o.id } },
    el("td", {}, when(o.decided_at || o.expires_at)),
    el("td", {}, el("span", { className: "status status-" + o.status }, o.status.replace("_", " "))),
    el("td", { className: "agent" }, o.agent),
    el("td", { className: "what" }, el("a", { href: requestHref(o.id) }, whatItDoes(o))),
    el("td", { className: "target" }, el("span", { className: "method" }, o.method), " ", target(o)),
    el("td", { className: "who" }, (o.votes || []).map((v) => v.approver).join(", ") || "—"),
    el("td", { className: "why" }, o.decided_reason || (o.votes || []).map((v) => v.reason).join("; ") || "—"),
    el("td", { className: "changed" }, o.changes && Object.keys(o.changes).length
      ? Object.entries(o.changes).map(([k, v]) => k + " → " + shortValue(v)).join(", ") : "—"),
    el("td", {}, el("a", { href: requestHref(o.id) + "#audit" }, "audit")))));
}

// --- start ------------------------------------------------------------------------------------------------

const PAGES = { "sign-in": signInPage, inbox: inboxPage, request: requestPage, history: historyPage };

document.addEventListener("DOMContentLoaded", () => {
  const page = PAGES[document.body.dataset.page];
  if (page) Promise.resolve(page()).catch(showError);
});
