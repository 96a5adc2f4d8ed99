"""Who is calling: the bearer credential of a request, resolved to a Caller with scopes (tuneloop/keys.py).

Keys are looked up in the database off the event loop and the answer is cached for `ttl_s` (revoking a key takes
effect on every gateway within that time); the cache is bounded, so a client spraying random keys cannot grow it.
While the database does not answer, a key seen in the last `stale_s` keeps its cached answer, so a database outage
(a locked SQLite, a Postgres restart) does not turn every inference request into a 503; a key revoked during the
outage therefore works until the database answers again, or for `stale_s` at most.
The admin token is compared in constant time; a key's digest is compared in constant time by `verify_key`.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from tuneloop.errors import AuthError, PermissionDenied, StoreError
from tuneloop.keys import ADMIN_TOKEN_CALLER, KEY_PATTERN, Caller, Scope, digest, verify_key
from tuneloop.store import Store

MAX_CREDENTIAL_CHARS = 200


class Authenticator:
    def __init__(self, store: Store, admin_token: str | None, *, ttl_s: float = 5.0, stale_s: float = 300.0,
                 max_cached: int = 10_000) -> None:
        self.store, self.admin_token, self.ttl_s, self.max_cached = store, admin_token, ttl_s, max_cached
        self.stale_s = stale_s
        self._cache: OrderedDict[str, tuple[Caller | None, float]] = OrderedDict()

    async def caller(self, request: Request, *, open_gateway: bool = False) -> Caller | None:
        """The request's caller; None when it sends no credential; AuthError for a bad or unknown one.

        `open_gateway` (inference with `serving.require_api_key` off): a credential that is not a tuneloop key at
        all, such as the "EMPTY" the OpenAI client needs to be given, is no credential; a tuneloop key that is
        revoked or wrong is still refused, so its holder learns of it."""
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        is_admin_token = bool(self.admin_token) and hmac.compare_digest(token.encode("utf-8", "replace"),
                                                                        str(self.admin_token).encode())
        if open_gateway and not is_admin_token and not KEY_PATTERN.fullmatch(token):
            return None
        if scheme.lower() != "bearer" or not token:
            raise AuthError("malformed Authorization header: send 'Authorization: Bearer <key>'")
        if len(token) > MAX_CREDENTIAL_CHARS:
            raise AuthError("invalid API key")
        if is_admin_token:
            return ADMIN_TOKEN_CALLER
        key = digest(token)
        cached = self._cache.get(key)
        if cached is not None and cached[1] > time.monotonic():
            found = cached[0]
        else:
            try:
                found = await run_in_threadpool(verify_key, self.store, token)
            except StoreError:
                if cached is None or cached[1] + self.stale_s < time.monotonic():
                    raise
                return self._known(cached[0])
            self._cache[key] = (found, time.monotonic() + self.ttl_s)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return self._known(found)

    @staticmethod
    def _known(found: Caller | None) -> Caller:
        if found is None:
            raise AuthError("invalid or revoked API key")
        return found

    async def require(self, request: Request, scope: Scope) -> Caller:
        """The caller, who must hold `scope` (admin holds every scope)."""
        caller = await self.caller(request)
        if caller is None:
            raise AuthError(f"this route needs an API key with the '{scope}' scope: send 'Authorization: Bearer "
                            f"<key>' (create one with `tuneloop keys create NAME --scope {scope}`)")
        permit(caller, scope)
        return caller


def permit(caller: Caller, scope: Scope) -> None:
    if not caller.can(scope):
        raise PermissionDenied(f"key {caller.key_id} ({caller.name}) has scope(s) {sorted(caller.scopes)}; this "
                               f"needs '{scope}'")
