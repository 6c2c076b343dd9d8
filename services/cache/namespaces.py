"""Namespaces: which entries a tenant may see, and the normalization and policy that apply to them.

Every tenant has its own namespace, named after it, unless its configuration explicitly shares one
(``share_as: faq``): tenants that share a name see each other's entries. Shared namespace names start with ``@``,
a character tenant ids cannot contain, so a shared namespace can never collide with a tenant's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from services.cache.normalizer import Normalizer, NormalizerConfig
from services.cache.policy import CachePolicy

TENANT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SHARED_PREFIX = "@"


class TenantConfig(BaseModel):
    """One tenant's overrides; unset parts take the service-wide defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    share_as: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="Explicitly share entries with every tenant that names the same shared namespace.",
    )
    normalizer: NormalizerConfig | None = None
    policy: CachePolicy | None = None


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    normalizer: Normalizer
    policy: CachePolicy


class Namespaces:
    """Resolves a tenant to its namespace (compiled once per configured tenant)."""

    def __init__(
        self,
        *,
        normalizer: NormalizerConfig | None = None,
        policy: CachePolicy | None = None,
        tenants: dict[str, TenantConfig] | None = None,
    ) -> None:
        self._default_normalizer = Normalizer(normalizer)
        self._default_policy = policy or CachePolicy()
        self._configured: dict[str, Namespace] = {}
        for tenant, config in (tenants or {}).items():
            if not TENANT_ID.match(tenant):
                raise ValueError(f"tenant id {tenant!r} must match {TENANT_ID.pattern}")
            self._configured[tenant] = Namespace(
                name=SHARED_PREFIX + config.share_as if config.share_as else tenant,
                normalizer=Normalizer(config.normalizer) if config.normalizer else self._default_normalizer,
                policy=config.policy or self._default_policy,
            )

    def resolve(self, tenant: str) -> Namespace:
        configured = self._configured.get(tenant)
        if configured is not None:
            return configured
        return Namespace(tenant, self._default_normalizer, self._default_policy)
