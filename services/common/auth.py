"""Who may call what: API keys (stored only as SHA-256 digests) map callers to a role and, for tenants, a tenant.

Roles:

* ``tenant`` — an organisation's service calling the router for **one** tenant. A request may leave the tenant empty
  (it is filled in with the key's tenant) but may not name another one: ``PERMISSION_DENIED`` (reason
  ``TENANT_MISMATCH``), never a silent override, so a misconfigured caller learns about it at once.
* ``service`` — costmesh's own services (the router calling budget, cache and workers). May act for any tenant on
  the data-plane RPCs, but not on the admin ones.
* ``admin`` — operators (``costmesh budget …``, ``costmesh cache …``). Every RPC, every tenant.

Every RPC of every costmesh service has a :class:`MethodRule` in :data:`RULES`: the roles allowed, where the request
names its tenant, and what an empty tenant means (filled in with the caller's, or "every tenant", which only an
admin may ask for — ``GetUsage`` and ``GetStats`` across tenants, the global budget scope). ``SetBudget`` and
``Invalidate`` are admin only. Health and reflection stay open (probes). Methods without a rule are admin only, so an
RPC added later is closed until someone writes its rule (a unit test checks every proto RPC has one).

Keys are random 256-bit tokens (``costmesh certs key`` / ``costmesh certs dev`` make them), so one SHA-256 is the
right digest: slow password hashes (scrypt, argon2) protect low-entropy secrets against guessing, which a 256-bit
token does not need, and a per-request scrypt would cost milliseconds of CPU on every call. Only digests are kept in
settings; the presented key is hashed and looked up, nothing compares plaintext.

This module is pure (no gRPC); :mod:`services.common.auth_grpc` is the interceptor that applies it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from services.common.errors import PermissionDenied, Unauthenticated

KEY_PREFIX = "cm_"
DIGEST_PREFIX = "sha256:"
AUTHORIZATION = "authorization"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TENANT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: Longest Authorization value looked at (anything longer is rejected before hashing).
MAX_CREDENTIAL_CHARS = 512


class Role(StrEnum):
    TENANT = "tenant"
    SERVICE = "service"
    ADMIN = "admin"


def new_key() -> str:
    """A fresh API key: ``cm_`` + 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    """The SHA-256 of a key in hex: the only form settings ever hold (field ``sha256``)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# ---- settings -------------------------------------------------------------------------------------------------


class ApiKey(BaseModel):
    """One accepted key: its digest, its role and (for tenant keys) its tenant."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="Who holds the key (logs only).")
    role: Role = Role.TENANT
    tenant: str = Field("", description="The tenant a tenant key acts for; empty for service and admin keys.")
    sha256: str = Field(description="SHA-256 of the key, hex (``costmesh certs key`` prints it).")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.removeprefix(DIGEST_PREFIX).lower()
        if not _HEX64.match(value):
            raise ValueError("must be a SHA-256 digest: 64 hex digits (never the key itself)")
        return value

    @model_validator(mode="after")
    def _tenant_matches_role(self) -> ApiKey:
        if self.role is Role.TENANT and not _TENANT.match(self.tenant):
            raise ValueError("a tenant key needs tenant: 1-64 characters of [A-Za-z0-9._-]")
        if self.role is not Role.TENANT and self.tenant:
            raise ValueError(f"a {self.role} key acts for every tenant; leave tenant empty")
        return self


class AuthSettings(BaseModel):
    """The ``auth`` section of every service's settings (``COSTMESH_<SVC>_AUTH__ENABLED=true`` …).

    Off by default, so the embedded ``costmesh up`` / ``make run`` path needs no keys. That is on loopback only:
    beyond it a service refuses to start without API keys or mTLS (:mod:`services.common.exposure`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(False, description="Require an API key on every RPC (health and reflection excepted).")
    keys: tuple[ApiKey, ...] = Field((), description="Accepted keys, as digests.")
    keys_file: Path | None = Field(None, description="YAML/JSON list of more keys (same fields), e.g. a mounted file.")
    client_key: SecretStr | None = Field(
        None, description="Key this service sends to the services it calls (the router's service key)."
    )
    client_key_file: Path | None = Field(None, description="File holding that key (preferred over client_key).")

    def all_keys(self) -> tuple[ApiKey, ...]:
        """Inline keys plus those of ``keys_file`` (read now)."""
        if self.keys_file is None:
            return self.keys
        raw = yaml.safe_load(self.keys_file.read_text(encoding="utf-8")) or []
        if isinstance(raw, Mapping):
            raw = raw.get("keys", [])
        if not isinstance(raw, list):
            raise ValueError(f"{self.keys_file}: expected a list of keys")
        return (*self.keys, *(ApiKey.model_validate(item) for item in raw))

    def outgoing_key(self) -> str | None:
        """The key to present to other services, if one is configured."""
        if self.client_key_file is not None:
            return self.client_key_file.read_text(encoding="utf-8").strip() or None
        return self.client_key.get_secret_value() if self.client_key is not None else None


# ---- authentication -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role
    tenant: str = ""

    def may_act_for(self, tenant: str) -> bool:
        return self.role is not Role.TENANT or tenant == self.tenant


class Authenticator:
    """Maps an ``authorization`` metadata value to a :class:`Principal`."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._by_digest: dict[str, Principal] = {}
        for key in keys:
            if key.sha256 in self._by_digest:
                raise ValueError(f"key {key.name!r}: the same digest is listed twice")
            self._by_digest[key.sha256] = Principal(key.name, key.role, key.tenant)

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, authorization: str) -> Principal:
        """``Bearer <key>`` → the key's principal; ``Unauthenticated`` when missing, malformed or unknown."""
        if not authorization:
            raise Unauthenticated("an API key is required: metadata 'authorization: Bearer <key>'", reason="NO_KEY")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(authorization) > MAX_CREDENTIAL_CHARS:
            raise Unauthenticated("expected 'authorization: Bearer <key>'", reason="MALFORMED_KEY")
        # Looked up by the digest of what was presented: timing can only reveal digests the caller cannot steer.
        principal = self._by_digest.get(hashlib.sha256(token.encode("utf-8", "replace")).hexdigest())
        if principal is None:
            raise Unauthenticated("unknown API key", reason="UNKNOWN_KEY")
        return principal


# ---- authorization --------------------------------------------------------------------------------------------

#: What an empty tenant field means for a method.
EmptyTenant = Literal["fill", "all"]


@dataclass(frozen=True, slots=True)
class MethodRule:
    """Who may call one RPC and where its request names the tenant it acts for.

    ``tenant_field`` is a dotted path into the request (``attribution.tenant``, ``tenant``, ``scope.tenant``).
    ``empty="fill"``: an empty tenant is filled in with a tenant key's own (other roles pass it on as is).
    ``empty="all"``: an empty tenant means every tenant, which ``all_tenants`` roles (and admins) may ask for.
    """

    roles: frozenset[Role]
    tenant_field: str | None = None
    empty: EmptyTenant = "fill"
    all_tenants: frozenset[Role] = frozenset()


ADMIN_ONLY = MethodRule(frozenset())
_TENANT_OR_SERVICE = frozenset({Role.TENANT, Role.SERVICE})
_SERVICE = frozenset({Role.SERVICE})

#: Every costmesh RPC. Health and reflection are in :data:`PUBLIC_SERVICES`.
RULES: dict[str, MethodRule] = {
    # The front door: tenants (and internal callers acting for tenants).
    **{
        f"/costmesh.router.v1.RouterService/{m}": MethodRule(_TENANT_OR_SERVICE, "attribution.tenant")
        for m in ("Generate", "GenerateStream", "Classify", "SubmitAsync", "GetAsyncResult")
    },
    # Budget: the data plane is the router's; a tenant may read its own headroom and usage; policies are admin.
    "/costmesh.budget.v1.BudgetService/Reserve": MethodRule(_SERVICE, "attribution.tenant"),
    "/costmesh.budget.v1.BudgetService/Commit": MethodRule(_SERVICE, "tenant"),
    "/costmesh.budget.v1.BudgetService/Release": MethodRule(_SERVICE, "tenant"),
    "/costmesh.budget.v1.BudgetService/RenewReservation": MethodRule(_SERVICE, "tenant"),
    "/costmesh.budget.v1.BudgetService/RecordSavings": MethodRule(_SERVICE, "attribution.tenant"),
    "/costmesh.budget.v1.BudgetService/RecordSavingsBatch": MethodRule(_SERVICE, "tenant"),
    "/costmesh.budget.v1.BudgetService/SetBudget": ADMIN_ONLY,
    "/costmesh.budget.v1.BudgetService/GetBudget": MethodRule(_TENANT_OR_SERVICE, "scope.tenant", "all"),
    "/costmesh.budget.v1.BudgetService/GetUsage": MethodRule(_TENANT_OR_SERVICE, "tenant", "all"),
    # Cache: lookups and fills are the router's; invalidation is admin; a tenant may read its own counters.
    "/costmesh.cache.v1.CacheService/Lookup": MethodRule(_SERVICE, "attribution.tenant"),
    "/costmesh.cache.v1.CacheService/Fill": MethodRule(_SERVICE, "attribution.tenant"),
    "/costmesh.cache.v1.CacheService/Invalidate": ADMIN_ONLY,
    "/costmesh.cache.v1.CacheService/GetStats": MethodRule(_TENANT_OR_SERVICE, "tenant", "all"),
    # Workers: only the router (GetJob with no tenant is the router's internal read).
    "/costmesh.infer.v1.InferenceService/Generate": MethodRule(_SERVICE, "attribution.tenant"),
    "/costmesh.infer.v1.InferenceService/SubmitJob": MethodRule(_SERVICE, "attribution.tenant"),
    "/costmesh.infer.v1.InferenceService/GetJob": MethodRule(_SERVICE, "tenant", "all", all_tenants=_SERVICE),
    # Any router settles any finished job (services/router/settlement.py): the listing spans every tenant.
    "/costmesh.infer.v1.InferenceService/ListJobs": MethodRule(_SERVICE),
    "/costmesh.infer.v1.InferenceService/MarkJobSettled": MethodRule(_SERVICE, "tenant", "all", all_tenants=_SERVICE),
    "/costmesh.infer.v1.InferenceService/ListModels": MethodRule(_TENANT_OR_SERVICE),
}

#: The router's OpenAI-compatible HTTP front door (services/router/http.py): chat completions are Generate by another
#: door, so they follow Generate's rule (the tenant comes from ``x-costmesh-tenant`` or a tenant key); the model
#: list is open to every key.
HTTP_RULES: dict[str, MethodRule] = {
    "POST /v1/chat/completions": RULES["/costmesh.router.v1.RouterService/Generate"],
    "GET /v1/models": MethodRule(frozenset({Role.TENANT, Role.SERVICE})),
}

#: Services callable without a key (kubelet probes, grpcurl's schema discovery).
PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.")


def is_public(method: str) -> bool:
    return method.startswith(PUBLIC_SERVICES)


def rule_for(method: str) -> MethodRule:
    return RULES.get(method, ADMIN_ONLY)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Allowed; ``fill_tenant`` is set when the request's empty tenant field must be filled with it."""

    fill_tenant: str = ""


def authorize(principal: Principal, rule: MethodRule, *, named: str, metadata_tenants: Sequence[str]) -> Verdict:
    """May ``principal`` make this call? ``named`` is the request's tenant field, ``metadata_tenants`` the values of
    ``x-costmesh-tenant`` (services fall back to them when the field is empty). Raises ``PermissionDenied``."""
    if principal.role is Role.ADMIN:
        return Verdict()
    if principal.role not in rule.roles:
        raise PermissionDenied(
            f"a {principal.role} key may not call this method", reason="ADMIN_REQUIRED" if not rule.roles else "ROLE"
        )
    if rule.tenant_field is None:
        return Verdict()
    # Services fall back to metadata for an empty field, except where empty means "every tenant".
    effective = named if rule.empty == "all" else named or next((t for t in reversed(metadata_tenants) if t), "")
    if principal.role is Role.TENANT:
        for tenant in (named, *metadata_tenants):
            if tenant and tenant != principal.tenant:
                raise PermissionDenied(f"this key acts for tenant {principal.tenant!r} only", reason="TENANT_MISMATCH")
    if not effective:
        if rule.empty == "all":
            if principal.role in rule.all_tenants:
                return Verdict()
            raise PermissionDenied("every tenant at once needs an admin key; name your tenant", reason="ADMIN_REQUIRED")
        if principal.role is Role.TENANT:
            return Verdict(fill_tenant=principal.tenant)
    return Verdict()
