"""Bearer-token check for the admin API: constant-time compare; no token configured means no admin access."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from tuneloop.errors import AuthError


def require_admin(request: Request, expected: str | None) -> None:
    if not expected:
        raise AuthError("admin API disabled: set TUNELOOP_ADMIN_TOKEN (or serving.admin_token) on the gateway")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing bearer token: send 'Authorization: Bearer <admin token>'")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise AuthError("invalid admin token")
