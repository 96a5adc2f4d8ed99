"""API keys: who may call which gateway route, and how much.

A key is `tl_<id>_<secret>`: the id is public (it is on every captured request, in the metrics and in `keys list`),
the secret is 256 random bits that only its holder has. The database keeps the SHA-256 of the whole key, never the
key; with that much entropy a slow password hash adds nothing, and a per-request SHA-256 costs microseconds.
Verification compares digests in constant time.

Scopes: `inference` (/v1/chat/completions, /v1/completions, /v1/models), `feedback` (/v1/feedback), `webhook`
(the Alertmanager receiver), `admin` (everything: /admin/*, reports, overwriting a label, marking requests as
evaluation traffic). The gateway's admin token (TUNELOOP_ADMIN_TOKEN, or the local credential `tuneloop init`
writes) is an admin key by another name.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, get_args

from pydantic import BaseModel
from sqlalchemy import select

from tuneloop.errors import ApiKeyError
from tuneloop.store import Store
from tuneloop.tables import ApiKeyRow

Scope = Literal["inference", "feedback", "admin", "webhook"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
KEY_PATTERN = re.compile(r"tl_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
ADMIN_TOKEN_ID = "admin-token"
MAX_PER_MINUTE = 10**9


class ApiKey(BaseModel):
    """A key as `keys list` shows it: everything but the secret."""

    id: str
    name: str
    scopes: list[Scope]
    rpm: int | None
    tpm: int | None
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key's id, name, scopes and limits."""

    key_id: str
    name: str
    scopes: frozenset[str]
    rpm: int | None = None
    tpm: int | None = None

    def can(self, scope: Scope) -> bool:
        return scope in self.scopes or "admin" in self.scopes


ADMIN_TOKEN_CALLER = Caller(key_id=ADMIN_TOKEN_ID, name="admin token", scopes=frozenset({"admin"}))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(id=row.id, name=row.name, scopes=list(row.scopes), rpm=row.rpm, tpm=row.tpm,  # type: ignore[arg-type]
                  created_at=row.created_at, revoked_at=row.revoked_at)


def _limit(name: str, value: int | None) -> None:
    if value is not None and not 1 <= value <= MAX_PER_MINUTE:
        raise ApiKeyError(f"--{name} must be between 1 and {MAX_PER_MINUTE:,} per minute, got {value}")


def create_key(store: Store, name: str, scopes: list[str], *, rpm: int | None = None,
               tpm: int | None = None) -> tuple[ApiKey, str]:
    """Register a key; returns it and the full key, which is shown once and stored only as a digest."""
    if not NAME_PATTERN.fullmatch(name):
        raise ApiKeyError(f"key name {name!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ApiKeyError(f"unknown scope(s) {unknown}; choose from {list(SCOPES)}" if unknown
                          else f"a key needs at least one scope ({', '.join(SCOPES)})")
    _limit("rpm", rpm)
    _limit("tpm", tpm)
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    full = f"tl_{key_id}_{secret}"
    with store.session() as session:
        if session.scalars(select(ApiKeyRow).where(ApiKeyRow.name == name)).first() is not None:
            raise ApiKeyError(f"a key named {name!r} exists; revoke it or choose another name")
        row = ApiKeyRow(id=key_id, name=name, scopes=sorted(set(scopes)), secret_sha256=digest(full), rpm=rpm,
                        tpm=tpm, created_at=datetime.now(UTC))
        session.add(row)
        session.flush()
        return _key(row), full


def list_keys(store: Store) -> list[ApiKey]:
    with store.session() as session:
        return [_key(row) for row in session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))]


def revoke_key(store: Store, name: str) -> ApiKey:
    """Revoke by name; the row stays so captured requests still name the key that sent them."""
    with store.session() as session:
        row = session.scalars(select(ApiKeyRow).where(ApiKeyRow.name == name)).first()
        if row is None:
            known = sorted(session.scalars(select(ApiKeyRow.name)))
            raise ApiKeyError(f"no key named {name!r}; keys: {known or 'none'}")
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
        return _key(row)


def verify_key(store: Store, presented: str) -> Caller | None:
    """The caller a presented key belongs to, or None for a malformed, unknown or revoked key."""
    match = KEY_PATTERN.fullmatch(presented)
    if match is None:
        return None
    with store.session() as session:
        row = session.get(ApiKeyRow, match.group("id"))
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(digest(presented), row.secret_sha256):
            return None
        return Caller(key_id=row.id, name=row.name, scopes=frozenset(row.scopes), rpm=row.rpm, tpm=row.tpm)
