"""The answer of `GET /overrides/{id}/context` as models, so the API's docs say what each part holds.

The values are built by `proxy.oversight.review_context`; these models only describe them. Everything
here that the agent chose (justification, session, paths, arguments) is data, never markup.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class AgentStatementsPublic(BaseModel):
    id: str = Field(description="the agent, as authenticated by the proxy")
    justification: str | None = Field(description="its X-Agent-Justification")
    confidence: str | None = Field(description="its X-Agent-Confidence, a number from 0 to 1 as text")
    session: str | None = Field(description="its X-Agent-Session")


class RecentCallPublic(BaseModel):
    decision_id: str
    at: datetime
    method: str
    host: str
    path: str
    action: str
    tool: str | None = Field(description="the MCP tool, for a tools/call")
    decision: str = Field(description="allow, deny, escalate or error")
    policies: list[str] = Field(description="the @ids of the policies that decided it")
    upstream_status: int | None = Field(description="the upstream's answer, once the call went")
    this_request: bool = Field(description="the call that opened this request")


class RecentCallsPublic(BaseModel):
    scope: str = Field(description='"session": the calls of the agent\'s session; "agent": it sent none, so '
                                   "the agent's latest calls")
    session: str | None
    calls: list[RecentCallPublic] = Field(description="newest first, at most 20")


class SimilarVotePublic(BaseModel):
    approver: str
    verdict: str
    reason: str
    at: datetime


class SimilarRequestPublic(BaseModel):
    id: str
    status: str
    agent: str
    created_at: datetime
    decided_at: datetime | None
    decided_reason: str | None
    changes: dict | None = Field(description="what its approvals changed, if anything")
    key_arguments: dict[str, str]
    votes: list[SimilarVotePublic]


class SimilarPublic(BaseModel):
    policy: str | None = Field(description="the escalating policy they share")
    tool: str | None = Field(description="the MCP tool they share (null: not MCP tool calls)")
    action: str
    outcomes: dict[str, int] = Field(description="how many ended in each status")
    requests: list[SimilarRequestPublic] = Field(description="the latest decided first, at most 10")


class PolicyNowPublic(BaseModel):
    id: str
    reason: str | None
    annotations: dict[str, str] = Field(description="as they were when the request was opened")
    in_live_revision: bool = Field(description="whether the live policies still have a policy of this @id")
    live_annotations: dict[str, str] | None = Field(description="its annotations in the live revision")


class PolicyStatePublic(BaseModel):
    revision: str = Field(description="the policy revision that escalated the request")
    live_revision: str
    is_live: bool = Field(description="whether that revision is still the one deciding calls")
    policies: list[PolicyNowPublic]


class ReviewContextPublic(BaseModel):
    id: str
    agent: AgentStatementsPublic
    recent_calls: RecentCallsPublic
    similar: SimilarPublic
    policy: PolicyStatePublic


class ChainTierPublic(BaseModel):
    tier: int = Field(description="1 for the policy's @escalate roles, 2 and up for @escalate_after's tiers")
    roles: list[str] = Field(description="the roles this tier adds: their approvers may decide once it is reached")
    after_seconds: int = Field(description="how long after the request was opened the tier is reached")
    at: datetime = Field(description="when the tier is (or was) reached")
    reached: bool = Field(description="whether it has been reached (for a decided request: by its decision)")


class ChainPublic(BaseModel):
    """Where a request stands in its escalation chain: each tier may decide once reached, the earlier
    tiers still may; at the expiry the request is rejected."""

    tiers: list[ChainTierPublic] = Field(description="tier 1 first; a request without @escalate_after has one")
    tier: int = Field(description="the current tier: the last one reached")
    tier_count: int
    remind_every: int | None = Field(description="seconds between reminders of the current tier (@remind)")
    next_step: str | None = Field(description='"tier N" or "expiry"; null once decided')
    next_step_at: datetime | None = Field(description="when the next step comes; null once decided")
    primary_reviewer: str | None = Field(
        description="the approver named first at the last step: of the current tier's, the one with the fewest "
                    "requests waiting that they may decide; null when none can sign in, or once decided")
