"""Named steps where a crash can be injected from outside, for the fault benchmarks (bench/bench_recovery.py).

`TUNELOOP_FAILPOINTS="promotion.after_load=kill"` makes the process SIGKILL itself when it reaches that step, as
the OOM killer or a power cut would stop it there. A signal sent from another process cannot be timed to land
between two writes a few milliseconds apart; naming the step can (etcd's gofail and TiKV's fail-rs test crash
recovery the same way). Unset, as in production, reaching a point costs one dictionary lookup.

Who may set it: whoever controls the process's environment, who can kill the process anyway.
"""

from __future__ import annotations

import functools
import os
import signal
from typing import Literal

from tuneloop.errors import ConfigError

FAILPOINTS_ENV = "TUNELOOP_FAILPOINTS"
Action = Literal["kill"]
ACTIONS: tuple[Action, ...] = ("kill",)

POINTS: dict[str, str] = {
    "promotion.after_load": "the gateway loaded the new champion into its engine; the alias is not flipped yet",
    "promotion.after_alias": "the alias flip and its event are committed; this gateway does not route to it yet",
    "worker.after_promote": "a retraining worker promoted its candidate; the job's end is not recorded yet",
}


def parse_failpoints(text: str) -> dict[str, Action]:
    """`point=action,point=action` -> {point: action}; every mistake is reported at once."""
    chosen: dict[str, Action] = {}
    problems = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, action = item.partition("=")
        if point not in POINTS:
            problems.append(f"unknown failpoint '{point}'; known: {', '.join(POINTS)}")
        elif action not in ACTIONS:
            problems.append(f"failpoint '{point}' has action '{action}'; known: {', '.join(ACTIONS)}")
        else:
            chosen[point] = "kill"
    if problems:
        raise ConfigError(f"{FAILPOINTS_ENV} is invalid", problems)
    return chosen


@functools.cache
def active() -> dict[str, Action]:
    """The failpoints set in this process's environment (read once)."""
    return parse_failpoints(os.environ.get(FAILPOINTS_ENV, ""))


def reach(point: str) -> None:
    """Called at the step `point` names: SIGKILLs this process if that failpoint is set."""
    if point not in POINTS:
        raise ValueError(f"unknown failpoint '{point}'")
    if active().get(point) == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
