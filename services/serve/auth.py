"""API-key authentication: the key's sha256 names the tenant.

Keys are never stored, only their hashes, in one env var (mounted from a Kubernetes Secret):

    TSUBASA_API_KEYS="acme:<sha256 hex of acme's key>,globex:<sha256 hex>,acme:<a second acme key>"

A tenant may have several keys (rotation). `hash_key("sk-...")` or
`python -c "import hashlib,sys;print(hashlib.sha256(sys.argv[1].encode()).hexdigest())" KEY` makes one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

from tsubasa.schema import validate_identifier

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AuthError(Exception):
    """401: missing or unknown key (the message never says which keys exist)."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_spec(spec: str) -> dict[str, str]:
    """`tenant:sha256hex,...` -> {sha256hex: tenant}; ValueError naming the bad entry."""
    table: dict[str, str] = {}
    for i, raw in enumerate(p.strip() for p in spec.replace("\n", ",").split(",")):
        if not raw:
            continue
        tenant, sep, digest = raw.partition(":")
        digest = digest.strip().lower()
        if not sep or not _HEX64.match(digest):
            raise ValueError(f"API key entry {i + 1} is not <tenant>:<64 hex sha256>")
        validate_identifier(tenant.strip(), "tenant")
        if digest in table and table[digest] != tenant.strip():
            raise ValueError(f"API key entry {i + 1}: the same key hash is given to two tenants")
        table[digest] = tenant.strip()
    return table


class APIKeyAuth:
    """Maps a bearer key to its tenant."""

    def __init__(self, table: dict[str, str]) -> None:
        self._table = dict(table)

    @classmethod
    def from_env(cls, var: str = "TSUBASA_API_KEYS") -> APIKeyAuth:
        return cls(parse_key_spec(os.environ.get(var, "")))

    @property
    def tenants(self) -> set[str]:
        return set(self._table.values())

    def tenant_for(self, authorization: str | None, x_api_key: str | None = None) -> str:
        """The tenant of `Authorization: Bearer <key>` (or `X-API-Key`); AuthError otherwise."""
        key = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthError("the Authorization header must be 'Bearer <API key>'")
            key = value.strip()
        elif x_api_key:
            key = x_api_key.strip()
        if not key:
            raise AuthError("missing API key: send 'Authorization: Bearer <API key>'")
        digest = hash_key(key)
        # Compare against every entry in constant time so timing says nothing about near-misses.
        tenant = None
        for known, owner in self._table.items():
            if hmac.compare_digest(known, digest):
                tenant = owner
        if tenant is None:
            raise AuthError("invalid API key")
        return tenant
