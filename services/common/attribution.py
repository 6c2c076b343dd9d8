"""Cost attribution carried in gRPC metadata on every hop (and as OpenTelemetry baggage).

A request's own ``Attribution`` message wins; fields it leaves empty are taken from metadata, so callers that route
through a shared client can set tenant/team/feature once per channel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TENANT_KEY = "x-costmesh-tenant"
TEAM_KEY = "x-costmesh-team"
FEATURE_KEY = "x-costmesh-feature"
END_USER_KEY = "x-costmesh-end-user"
REQUEST_ID_KEY = "x-request-id"

_FIELDS = (("tenant", TENANT_KEY), ("team", TEAM_KEY), ("feature", FEATURE_KEY), ("end_user", END_USER_KEY))
_FIELD_OF_KEY = {key: name for name, key in _FIELDS}


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who a request is charged to (the domain twin of ``costmesh.common.v1.Attribution``)."""

    tenant: str = ""
    team: str = ""
    feature: str = ""
    end_user: str = ""

    def merged_with(self, fallback: Attribution) -> Attribution:
        """Fields of ``self`` that are empty are taken from ``fallback``."""
        return Attribution(
            tenant=self.tenant or fallback.tenant,
            team=self.team or fallback.team,
            feature=self.feature or fallback.feature,
            end_user=self.end_user or fallback.end_user,
        )

    def to_metadata(self) -> list[tuple[str, str]]:
        return [(key, getattr(self, name)) for name, key in _FIELDS if getattr(self, name)]


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Attribution:
    values: dict[str, str] = {}
    for key, value in metadata or ():
        name = _FIELD_OF_KEY.get(key.lower())
        if name is not None and isinstance(value, str):
            values[name] = value
    return Attribution(**values)


def metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str:
    for k, v in metadata or ():
        if k.lower() == key and isinstance(v, str):
            return v
    return ""
