"""Per-key limits on requests and tokens per minute, answered as OpenAI answers them: 429, Retry-After and the
`x-ratelimit-*` headers.

A sliding 60-second window per key, in memory: each gateway enforces the key's limit on what it serves itself,
so N gateways behind a balancer admit up to N times the limit (docs/reliability.md). Tokens are charged when a
request finishes, from the usage vLLM reports, and a key whose window already holds its tokens-per-minute is
refused until enough of them age out.
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


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
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
        with self._lock:
            now = self._clock()
            requests, tokens = self._trim(caller.key_id, now)
            used_tokens = sum(n for _, n in tokens)
            headers: dict[str, str] = {}
            waits = []
            if caller.rpm is not None:
                full = len(requests) >= caller.rpm
                reset = requests[0] + WINDOW_S - now if requests else 0.0
                headers |= {"x-ratelimit-limit-requests": str(caller.rpm),
                            "x-ratelimit-remaining-requests": str(max(0, caller.rpm - len(requests) - (not full))),
                            "x-ratelimit-reset-requests": f"{reset:.1f}s"}
                if full:
                    waits.append(reset)
            if caller.tpm is not None:
                reset, freed = 0.0, used_tokens
                for at, n in tokens:  # the time until the window holds less than the limit again
                    if freed < caller.tpm:
                        break
                    freed -= n
                    reset = at + WINDOW_S - now
                headers |= {"x-ratelimit-limit-tokens": str(caller.tpm),
                            "x-ratelimit-remaining-tokens": str(max(0, caller.tpm - used_tokens)),
                            "x-ratelimit-reset-tokens": f"{reset:.1f}s"}
                if used_tokens >= caller.tpm:
                    waits.append(reset)
            if waits:
                retry = max(1, math.ceil(max(waits)))
                which = "requests" if caller.rpm is not None and len(requests) >= caller.rpm else "tokens"
                raise RateLimited(f"key {caller.key_id} ({caller.name}) is over its {which} per minute; retry in "
                                  f"{retry} s", retry, {**headers, "Retry-After": str(retry)})
            requests.append(now)
            return headers

    def charge(self, caller: Caller | None, tokens: int) -> None:
        """Count the tokens a finished request used against its key (kept only for keys with a token limit)."""
        if caller is None or caller.tpm is None or tokens <= 0:
            return
        with self._lock:
            now = self._clock()
            self._trim(caller.key_id, now)[1].append((now, tokens))
