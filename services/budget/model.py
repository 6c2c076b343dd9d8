"""Budget domain types: scopes, windows, limits, policies and the numbers a store reports about a scope.

Nothing here knows gRPC or a store. Money is integer micro-USD; token counts are integers; times are Unix ms.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from functools import lru_cache

from services.common.attribution import Attribution

#: Largest amount (micro-USD) or token count a limit or counter may hold. Sums stay below 2**53, so the Lua side
#: (whose numbers are doubles) stays exact: 10**15 micro-USD is one billion USD.
MAX_AMOUNT = 10**15
#: Soft threshold used when a policy sets none, in parts per million of the limit.
DEFAULT_SOFT_PPM = 800_000
PPM = 1_000_000
#: Separator inside store keys and fields; identifiers may not contain control characters.
SEP = "\x1f"


class ScopeKind(enum.IntEnum):
    GLOBAL = 1
    TENANT = 2
    TEAM = 3
    FEATURE = 4
    END_USER = 5


class Window(enum.IntEnum):
    HOUR = 1
    DAY = 2
    MONTH = 3
    LIFETIME = 4


class Tier(enum.IntEnum):
    UNSPECIFIED = 0
    CHEAP = 1
    FULL = 2


class ReservationState(enum.IntEnum):
    """Where a reservation is in its life (numbers as ``costmesh.budget.v1.ReservationState``)."""

    HELD = 1
    COMMITTED = 2
    RELEASED = 3
    EXPIRED = 4


#: Windows in the order stores report spent counters.
WINDOWS: tuple[Window, ...] = (Window.HOUR, Window.DAY, Window.MONTH, Window.LIFETIME)

_KIND_PREFIX = {ScopeKind.TEAM: "T:", ScopeKind.FEATURE: "F:", ScopeKind.END_USER: "U:"}
_PREFIX_KIND = {v: k for k, v in _KIND_PREFIX.items()}
_KIND_LABEL = {ScopeKind.TEAM: "team", ScopeKind.FEATURE: "feature", ScopeKind.END_USER: "end_user"}


@dataclass(frozen=True, slots=True)
class Scope:
    """A budget scope. ``tenant`` is empty only for GLOBAL; ``name`` is set only for TEAM, FEATURE, END_USER."""

    kind: ScopeKind
    tenant: str = ""
    name: str = ""

    @property
    def domain(self) -> str:
        """The tenant whose keys hold this scope's state; '' for the global scope."""
        return self.tenant

    @property
    def key(self) -> str:
        """The scope's key inside its domain: ``g``, ``t``, ``T:<team>``, ``F:<feature>``, ``U:<end user>``."""
        if self.kind is ScopeKind.GLOBAL:
            return "g"
        if self.kind is ScopeKind.TENANT:
            return "t"
        return _KIND_PREFIX[self.kind] + self.name

    def label(self) -> str:
        """Human-readable and stable: ``global``, ``tenant:acme``, ``tenant:acme/team:search``."""
        if self.kind is ScopeKind.GLOBAL:
            return "global"
        base = f"tenant:{self.tenant}"
        if self.kind is ScopeKind.TENANT:
            return base
        return f"{base}/{_KIND_LABEL[self.kind]}:{self.name}"

    @staticmethod
    def from_key(tenant: str, key: str) -> Scope:
        """Inverse of :attr:`key` for a scope of ``tenant`` ('' for global)."""
        if key == "g":
            return Scope(ScopeKind.GLOBAL)
        if key == "t":
            return Scope(ScopeKind.TENANT, tenant)
        return Scope(_PREFIX_KIND[key[:2]], tenant, key[2:])

    @staticmethod
    def global_() -> Scope:
        return Scope(ScopeKind.GLOBAL)


def applicable_scopes(attribution: Attribution) -> list[Scope]:
    """Every scope a request of ``attribution`` is charged to: global, tenant, and team/feature/end user if set."""
    t = attribution.tenant
    scopes = [Scope(ScopeKind.GLOBAL), Scope(ScopeKind.TENANT, t)]
    if attribution.team:
        scopes.append(Scope(ScopeKind.TEAM, t, attribution.team))
    if attribution.feature:
        scopes.append(Scope(ScopeKind.FEATURE, t, attribution.feature))
    if attribution.end_user:
        scopes.append(Scope(ScopeKind.END_USER, t, attribution.end_user))
    return scopes


@dataclass(frozen=True, slots=True)
class Limit:
    """A hard limit over one window; ``None`` = no limit of that kind."""

    window: Window
    cost_micros: int | None = None
    tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """The budget policy of one scope."""

    scope: Scope
    limits: tuple[Limit, ...] = ()
    soft_threshold_ppm: int = DEFAULT_SOFT_PPM
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_tokens_per_request: int = 0

    @property
    def rate_capped(self) -> bool:
        return self.requests_per_minute > 0 or self.tokens_per_minute > 0

    def soft_value(self, limit: int) -> int:
        """The soft threshold of ``limit`` (spent + reserved at or past it is 'soft exceeded')."""
        return limit * self.soft_threshold_ppm // PPM

    def to_json(self) -> str:
        """The stored form (shared by both stores and read by the Lua scripts): -1 = unset."""
        return json.dumps(
            {
                "l": [
                    [
                        int(x.window),
                        -1 if x.cost_micros is None else x.cost_micros,
                        -1 if x.tokens is None else x.tokens,
                    ]
                    for x in self.limits
                ],
                "s": self.soft_threshold_ppm,
                "r": self.requests_per_minute,
                "k": self.tokens_per_minute,
                "m": self.max_tokens_per_request,
            },
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(scope: Scope, text: str) -> Policy:
        return _policy_from_json(scope, text)


@lru_cache(maxsize=4096)
def _policy_from_json(scope: Scope, text: str) -> Policy:
    raw = json.loads(text)
    return Policy(
        scope=scope,
        limits=tuple(Limit(Window(w), None if c < 0 else int(c), None if t < 0 else int(t)) for w, c, t in raw["l"]),
        soft_threshold_ppm=int(raw["s"]),
        requests_per_minute=int(raw["r"]),
        tokens_per_minute=int(raw["k"]),
        max_tokens_per_request=int(raw["m"]),
    )


@dataclass(frozen=True, slots=True)
class ScopeSnapshot:
    """What a store saw of one scope with a policy, inside one atomic step.

    ``spent`` holds (cost micros, tokens) committed in the *current* bucket of each window, in :data:`WINDOWS`
    order. ``rate_*`` describe the rolling minute (only tracked for rate-capped policies).
    """

    policy: Policy
    reserved_micros: int = 0
    reserved_tokens: int = 0
    spent: tuple[tuple[int, int], ...] = ((0, 0), (0, 0), (0, 0), (0, 0))
    rate_requests: int = 0
    rate_tokens: int = 0
    rate_oldest_s: int = 0

    @property
    def scope(self) -> Scope:
        return self.policy.scope

    def spent_in(self, window: Window) -> tuple[int, int]:
        return self.spent[int(window) - 1]


@dataclass(frozen=True, slots=True)
class Buckets:
    """The current bucket of every window at one instant (see :mod:`services.budget.windows`)."""

    now_ms: int
    hour: int
    day: int
    month: int

    def of(self, window: Window) -> int:
        if window is Window.HOUR:
            return self.hour
        if window is Window.DAY:
            return self.day
        if window is Window.MONTH:
            return self.month
        return 0


@dataclass(frozen=True, slots=True)
class UsageDims:
    """Attribution dimensions of one usage record."""

    team: str = ""
    feature: str = ""
    model: str = ""
    tier: int = 0
    end_user: str = ""

    def encode(self) -> str:
        return SEP.join((self.team, self.feature, self.model, str(self.tier), self.end_user))

    @staticmethod
    def decode(text: str) -> UsageDims:
        team, feature, model, tier, end_user = text.split(SEP)
        return UsageDims(team, feature, model, int(tier), end_user)


@dataclass(slots=True)
class UsageCounters:
    """Additive usage counters (one rollup cell, or a sum of many)."""

    cost_micros: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    requests: int = 0
    saved_micros: int = 0
    cache_hits: int = 0
    over_estimate: int = 0
    late_commits: int = 0
    """Commits of a reservation that had expired or been released (recorded in full: overspend events)."""

    def add(self, other: UsageCounters) -> None:
        self.cost_micros += other.cost_micros
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.requests += other.requests
        self.saved_micros += other.saved_micros
        self.cache_hits += other.cache_hits
        self.over_estimate += other.over_estimate
        self.late_commits += other.late_commits


#: Single-letter field codes of :class:`UsageCounters` in stores (order matters for SQLite columns).
COUNTER_CODES: tuple[tuple[str, str], ...] = (
    ("c", "cost_micros"),
    ("i", "input_tokens"),
    ("o", "output_tokens"),
    ("k", "cached_input_tokens"),
    ("n", "requests"),
    ("s", "saved_micros"),
    ("h", "cache_hits"),
    ("x", "over_estimate"),
    ("l", "late_commits"),
)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One cell of usage for one tenant and dims (what the stores hand back to GetUsage)."""

    tenant: str
    dims: UsageDims
    counters: UsageCounters = field(default_factory=UsageCounters)
