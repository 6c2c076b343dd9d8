"""Span and metric attribute names used by costmesh — the one list (documented in docs/telemetry.md).

OpenTelemetry's GenAI semantic conventions are used wherever they define a name; costmesh's own names live under
``costmesh.*`` (OpenTelemetry has no standard cost attribute yet: semantic-conventions #2312).
"""

from __future__ import annotations

# --- OpenTelemetry GenAI semantic conventions ---
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"  # "chat" for generations
GEN_AI_SYSTEM = "gen_ai.system"  # "vllm"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"

# --- costmesh ---
COST_MICROS = "costmesh.cost.micros"  # int: micro-USD charged for this request / hop
BASELINE_MICROS = "costmesh.cost.baseline_micros"  # int: the same usage at full-tier list price, no cache
TIER = "costmesh.tier"  # "cheap" | "full"
ROUTE_SCORE = "costmesh.route.score"  # float in [0, 1]
ROUTE_POLICY = "costmesh.route.policy"  # which policy changed the tier, if any
ROUTE_UNCERTAIN = "costmesh.route.uncertain"  # bool
CACHE_HIT = "costmesh.cache.hit"  # bool
CACHE_COALESCED = "costmesh.cache.coalesced"  # bool: served by waiting on an identical in-flight miss
CACHE_SAVED_MICROS = "costmesh.cache.saved_micros"  # int: cost avoided by a hit (a savings batch: by all its hits)
SAVINGS_RECORDS = "costmesh.savings.records"  # int: savings records in one RecordSavingsBatch
BUDGET_REMAINING_MICROS = "costmesh.budget.remaining_micros"  # int: smallest remaining across applicable scopes
BUDGET_RESERVATION_ID = "costmesh.budget.reservation_id"
CACHE_OUTCOME = "costmesh.cache.outcome"  # "hit" | "miss" | "uncacheable" | "wait_timeout" | "unavailable"
BUDGET_ESTIMATED_MICROS = "costmesh.budget.estimated_micros"  # int: what Reserve held for the request
#: "reserved" | "replayed" | "rejected" (Reserve), "committed" | "committed_late" | "replayed" (Commit),
#: "released" (Release), "renewed" | "settled" | "expired" | "not_found" (RenewReservation)
BUDGET_OUTCOME = "costmesh.budget.outcome"
BUDGET_SOFT_EXCEEDED = "costmesh.budget.soft_limit_exceeded"  # bool: a soft threshold was crossed
QUEUE_CLASS = "costmesh.queue_class"  # "interactive" | "async"
JOB_ID = "costmesh.job.id"  # durable async job
JOB_ATTEMPT = "costmesh.job.attempt"  # int: 1 on the first run of a job
CACHED_INPUT_TOKENS = "costmesh.usage.cached_input_tokens"  # int: prompt tokens served from the prefix cache
ESCALATED = "costmesh.escalated"  # bool
TENANT = "costmesh.tenant"
TEAM = "costmesh.team"
FEATURE = "costmesh.feature"
END_USER = "costmesh.end_user"
REQUEST_ID = "costmesh.request_id"

#: Span event marking the first generated token (attribute ``costmesh.ttft_ms``).
EVENT_FIRST_TOKEN = "gen_ai.first_token"
TTFT_MS = "costmesh.ttft_ms"

#: Attributes that also travel as W3C baggage between services.
BAGGAGE_KEYS = (TENANT, TEAM, FEATURE)
