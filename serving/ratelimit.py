"""Per-key limits on requests and tokens per minute, answered as OpenAI answers them: 429, Retry-After and the
`x-ratelimit-*` headers.

A sliding 60-second window per key, in memory, with no database round trip per request: each gateway enforces
its share of the key's limit, the limit divided by the gateways live on the database (serving/membership.py,
rounded down, at least 1), so N gateways behind a balancer admit the limit in total (at most N for a limit below
N). The headers give the share this gateway enforces. Tokens are charged when a request finishes, from the usage
vLLM reports, and a key whose window already holds its tokens-per-minute is refused until enough of them age out.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from tuneloop.errors import RateLimited
from tuneloop.keys import Caller

WINDOW_S = 60.0


def share_of(limit: int | None, gateways: int) -> int | None:
    """This gateway's part of a key's per-minute limit when `gateways` share it."""
    return None if limit is None else max(1, limit // max(1, gateways))


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic, *,
                 gateways: Callable[[], int] = lambda: 1) -> None:
        """`gateways`: how many gateways share the keys' limits now (GatewayMembership.live)."""
        self._clock = clock
        self._gateways = gateways
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def _trim(self, key_id: str, now: float) -> tuple[deque[float], deque[tuple[float, int]]]:
        requests = self._requests.setdefault(key_id, deque())
        tokens = self._tokens.setdefault(key_id, deque())
        while requests and requests[0] <= now - WINDOW_S:
            requests.popleft()
        while tokens and tokens[0][0] <= now - WINDOW_S:
            tokens.popleft()
        return requests, tokens

    def admit(self, caller: Caller | None) -> dict[str, str]:
        """Count one request for the caller, or raise RateLimited; returns the x-ratelimit headers."""
        if caller is None or (caller.rpm is None and caller.tpm is None):
            return {}
        gateways = self._gateways()
        rpm, tpm = share_of(caller.rpm, gateways), share_of(caller.tpm, gateways)
        with self._lock:
            now = self._clock()
            requests, tokens = self._trim(caller.key_id, now)
            used_tokens = sum(n for _, n in tokens)
            headers: dict[str, str] = {}
            waits = []
            if rpm is not None:
                full = len(requests) >= rpm
                reset = requests[0] + WINDOW_S - now if requests else 0.0
                headers |= {"x-ratelimit-limit-requests": str(rpm),
                            "x-ratelimit-remaining-requests": str(max(0, rpm - len(requests) - (not full))),
                            "x-ratelimit-reset-requests": f"{reset:.1f}s"}
                if full:
                    waits.append(reset)
            if tpm is not None:
                reset, freed = 0.0, used_tokens
                for at, n in tokens:  # the time until the window holds less than the limit again
                    if freed < tpm:
                        break
                    freed -= n
                    reset = at + WINDOW_S - now
                headers |= {"x-ratelimit-limit-tokens": str(tpm),
                            "x-ratelimit-remaining-tokens": str(max(0, tpm - used_tokens)),
                            "x-ratelimit-reset-tokens": f"{reset:.1f}s"}
                if used_tokens >= tpm:
                    waits.append(reset)
            if waits:
                retry = max(1, math.ceil(max(waits)))
                which = "requests" if rpm is not None and len(requests) >= rpm else "tokens"
                shared = (f" ({rpm if which == 'requests' else tpm} on this gateway: the limit shared by {gateways} "
                          "gateways)" if gateways > 1 else "")
                raise RateLimited(f"key {caller.key_id} ({caller.name}) is over its {which} per minute{shared}; retry "
                                  f"in {retry} s", retry, {**headers, "Retry-After": str(retry)})
            requests.append(now)
            return headers

    def charge(self, caller: Caller | None, tokens: int) -> None:
        """Count the tokens a finished request used against its key (kept only for keys with a token limit)."""
        if caller is None or caller.tpm is None or tokens <= 0:
            return
        with self._lock:
            now = self._clock()
            self._trim(caller.key_id, now)[1].append((now, tokens))
