"""API keys: who is calling (tenant), at what priority, and how fast they may call.

Keys come from a mounted file or Secret (YAML or JSON):

    keys:
      - key: "…"            # or keySha256: "<hex>" so the file need not hold the key itself
        tenant: studio-a
        priority: 10        # higher is served first
        rateLimit: 5        # requests per second (token bucket), 0 = unlimited
        burst: 20

Keys are never logged; only tenant names appear in logs and metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Tenant:
    name: str
    priority: int = 0
    rate_limit: float = 0.0
    burst: float = 10.0
    tokens: float = field(default=0.0, repr=False)
    updated: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def allow(self, now: float | None = None) -> float:
        """0 when the request may go now; else the seconds until a token is there."""
        if self.rate_limit <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate_limit)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_limit


ANONYMOUS = Tenant("anonymous")


class KeyStore:
    def __init__(self, entries: list[dict[str, Any]] | None = None) -> None:
        self._by_digest: dict[str, Tenant] = {}
        for i, entry in enumerate(entries or []):
            digest = entry.get("keySha256")
            if not digest:
                key = entry.get("key")
                if not key:
                    raise ValueError(f"keys[{i}]: set key or keySha256")
                digest = hashlib.sha256(str(key).encode()).hexdigest()
            tenant = Tenant(
                name=str(entry.get("tenant") or f"key-{i}"),
                priority=int(entry.get("priority", 0)),
                rate_limit=float(entry.get("rateLimit", 0)),
                burst=float(entry.get("burst", 10)),
            )
            self._by_digest[digest.lower()] = tenant

    @classmethod
    def from_file(cls, path: Path) -> KeyStore:
        doc = yaml.safe_load(path.read_text()) or {}
        return cls(doc.get("keys") or [])

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def lookup(self, presented: str | None) -> Tenant | None:
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).hexdigest()
        for known, tenant in self._by_digest.items():
            # Constant-time comparison of digests: no timing hints about valid keys.
            if hmac.compare_digest(known, digest):
                return tenant
        return None


def presented_key(headers: Any) -> str | None:
    """The key from `Authorization: Bearer …` or `X-API-Key`."""
    auth = headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return str(auth[7:].strip())
    key = headers.get("X-API-Key")
    return str(key) if key else None
