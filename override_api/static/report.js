// The report page (/inbox/report): how the reviews went, for approvers holding the auditor role. Plain
// script over inbox.js (el, api, session, header, fill, $), no build step, no dependency.
//
// Charts are inline SVG made with createElementNS; every name (policy @id, reviewer, suggested Cedar) is
// put in as a text node, never as markup. Colours come from classes in report.css: the page's content
// security policy allows no inline style.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const OUTCOMES = [
  ["unchanged", "approved as sent", (p) => p.approved - p.approved_with_changes],
  ["changed", "approved with changes", (p) => p.approved_with_changes],
  ["denied", "denied", (p) => p.denied],
  ["expired", "expired", (p) => p.expired],
  ["open", "still open", (p) => p.open],
];
const WIDTH = 760;
const LABEL = 230; // room for the names on the left
const ROW = 24;

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function chart(rows, draw, empty) {
  if (!rows.length) return el("p", { className: "empty" }, empty);
  const height = rows.length * ROW + 10;
  return svg("svg", { viewBox: `0 0 ${WIDTH} ${height}`, role: "img" },
    rows.map((row, i) => svg("g", { transform: `translate(0 ${i * ROW + 4})` },
      svg("text", { x: 0, y: 14, class: "label" }, clip(row.name)),
      svg("title", {}, row.name),
      draw(row, i))));
}

function clip(name) {
  return name.length > 32 ? name.slice(0, 31) + "…" : name;
}

function share(rate) {
  return rate === null || rate === undefined ? "–" : (rate * 100).toFixed(1) + "%";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min";
  if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(1) + " d";
}

function counted(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

function legend(items) {
  return items.map(([cls, text]) => el("span", {}, el("i", { className: "o-" + cls }), text));
}

function policyChart(policies) {
  const shown = policies.filter((p) => p.requests > 0);
  const most = Math.max(1, ...shown.map((p) => p.requests));
  const span = WIDTH - LABEL - 60;
  return chart(shown.map((p) => ({ name: p.policy, p })), ({ p }) => {
    let x = LABEL;
    const parts = [];
    for (const [cls, text, count] of OUTCOMES) {
      const n = count(p);
      if (!n) continue;
      const w = (n / most) * span;
      parts.push(svg("rect", { x, y: 2, width: Math.max(w, 1), height: ROW - 8, class: "o-" + cls },
        svg("title", {}, `${text}: ${n}`)));
      x += w;
    }
    parts.push(svg("text", { x: x + 6, y: 14, class: "muted" }, String(p.requests)));
    return parts;
  }, "No override requests in this window.");
}

function latencyChart(policies) {
  const shown = policies.filter((p) => p.latency_p95_s !== null);
  const longest = Math.max(...shown.map((p) => p.latency_p95_s)) || 1;  // seconds: scaled to the longest
  const span = WIDTH - LABEL - 140;
  return chart(shown.map((p) => ({ name: p.policy, p })), ({ p }) => [
    svg("rect", { x: LABEL, y: 2, width: Math.max((p.latency_p95_s / longest) * span, 1), height: ROW - 8, class: "p95" },
      svg("title", {}, "p95: " + duration(p.latency_p95_s))),
    svg("rect", { x: LABEL, y: 6, width: Math.max((p.latency_p50_s / longest) * span, 1), height: ROW - 16, class: "p50" },
      svg("title", {}, "p50: " + duration(p.latency_p50_s))),
    svg("text", { x: LABEL + span + 8, y: 14, class: "muted" },
      `p50 ${duration(p.latency_p50_s)} · p95 ${duration(p.latency_p95_s)}`),
  ], "No request was decided in this window.");
}

function reviewerChart(reviewers, threshold) {
  const shown = reviewers.filter((r) => r.votes > 0);
  const span = WIDTH - LABEL - 140;
  const line = LABEL + threshold * span;
  return chart(shown.map((r) => ({ name: r.reviewer, r })), ({ r }) => [
    svg("rect", { x: LABEL, y: 2, width: Math.max(r.approval_rate * span, 1), height: ROW - 8,
                  class: r.flagged ? "rate flagged-bar" : "rate" },
      svg("title", {}, `${share(r.approval_rate)} of ${r.votes} votes`)),
    svg("line", { x1: line, x2: line, y1: 0, y2: ROW - 4, class: "threshold" }),
    svg("text", { x: LABEL + span + 8, y: 14, class: r.flagged ? "label flagged" : "muted" },
      `${share(r.approval_rate)} of ${r.votes}` + (r.flagged ? " · flagged" : "")),
  ], "No reviewer voted in this window.");
}

function candidates(report) {
  if (!report.candidates.length) {
    return el("p", {}, `None: no policy had ${report.min_requests} or more decided requests approved as sent ` +
      `at ${share(report.threshold)} or more.`);
  }
  return report.candidates.map((c) => el("div", { className: "candidate" },
    el("p", {}, el("strong", {}, c.policy), `: ${c.approved_unchanged} of ${c.decided} decided requests ` +
      `approved as sent (${share(c.rate)}).`),
    c.suggestion
      ? [el("p", {}, `A narrowed forbid for ${c.file} that would stop asking for ` +
          (c.exact ? "exactly the approved combinations" : "the approved principals, actions and resources") +
          `; it would also have let through ${c.denied_exempted} denied request(s). It validates against the ` +
          "live schema; review it before use."),
        el("pre", { className: "cedar" }, c.suggestion)]
      : el("p", {}, "No suggestion: " + c.why_no_suggestion)));
}

function table(selector, columns, rows) {
  const node = $(selector);
  fill(node.tHead, el("tr", {}, columns.map(([title, , numeric]) => el("th", { className: numeric ? "number" : "" }, title))));
  fill(node.tBodies[0], rows.map((row) => el("tr", {},
    columns.map(([, value, numeric]) => el("td", { className: numeric ? "number" : "" }, value(row))))));
}

function render(report) {
  fill($("#summary"), `${counted(report.decisions, "call")} decided since ${when(report.since)}, ` +
    `${report.escalations} escalated (${share(report.escalation_rate)}), ` +
    `${counted(report.requests, "override request")}.`);
  fill($("#outcome-legend"), legend(OUTCOMES.map(([cls, text]) => [cls, text])));
  fill($("#policy-chart"), policyChart(report.policies));
  fill($("#latency-chart"), latencyChart(report.policies));
  fill($("#reviewer-chart"), reviewerChart(report.reviewers, report.threshold));
  fill($("#candidates"), candidates(report));
  table("#policies", [
    ["Policy", (p) => p.policy], ["Escalated", (p) => p.escalations, true], ["Rate", (p) => share(p.escalation_rate), true],
    ["Requests", (p) => p.requests, true], ["Approved", (p) => share(p.approval_rate), true],
    ["Changed", (p) => share(p.change_rate), true], ["Expired", (p) => p.expired, true],
    ["p50", (p) => duration(p.latency_p50_s), true], ["p95", (p) => duration(p.latency_p95_s), true],
  ], report.policies);
  table("#reviewers", [
    ["Reviewer", (r) => r.flagged ? el("span", { className: "flagged" }, r.reviewer + " (flagged)") : r.reviewer],
    ["Votes", (r) => r.votes, true], ["Approved", (r) => share(r.approval_rate), true],
    ["Changed", (r) => share(r.change_rate), true], ["p50", (r) => duration(r.latency_p50_s), true],
    ["p95", (r) => duration(r.latency_p95_s), true], ["Expiries", (r) => r.expiries, true],
  ], report.reviewers);
}

function chosen(form) {
  const query = new URLSearchParams();
  for (const name of ["since", "threshold", "min_requests"]) {
    const value = form.elements[name].value.trim();
    if (value) query.set(name, value);
  }
  return query;
}

async function loadReport(query) {
  let report;
  try {
    report = await api("GET", "/report?" + query);
  } catch (error) {
    if (error.status !== 403) throw error;
    $("#refused").textContent = error.message;
    $("#refused").hidden = false;
    $("#report").hidden = true;
    return;
  }
  $("#refused").hidden = true;
  $("#error").textContent = "";
  render(report);
  $("#report").hidden = false;
}

async function reportPage() {
  header(await session());
  const form = $("#window");
  const params = new URLSearchParams(location.search);
  for (const name of ["since", "threshold", "min_requests"]) {
    if (params.get(name)) form.elements[name].value = params.get(name);
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = chosen(form);
    history.replaceState(null, "", "/inbox/report?" + query);
    loadReport(query).catch(showError);
  });
  await loadReport(chosen(form));
}

PAGES.report = reportPage;
