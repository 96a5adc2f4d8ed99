"""`python -m tuneloop.serving.engine_guard WATCHED_PID ENGINE_PGID`: end an engine's whole process group once the
process that started it is gone, however it went.

Why: an engine replica is a Ray Serve actor that starts vLLM as its child, and Ray ends a dead actor's child
processes with SIGKILL (its `kill_child_processes_on_worker_exit`). vLLM's API server is that child; killed, it
cannot stop its EngineCore and Worker, which were measured outliving it and holding gigabytes each. Whatever is a
child of the actor dies the same way, so the guard detaches itself (a second fork: its parent exits at once and it
is adopted by init) and watches the actor's pid from outside; when the actor is gone, it ends vLLM's process
group (SIGTERM, then SIGKILL after a grace period). It also exits when the group is empty, its job done.
"""

from __future__ import annotations

import os
import sys
import time

from tuneloop.processes import process_alive
from tuneloop.serving.engine import end_process_group, process_group_members

GRACE_ENV = "TUNELOOP_ENGINE_GUARD_GRACE_S"  # how long vLLM gets for its orderly exit (default 20 s)
POLL_S = 0.5


def watch(watched: int, group: int) -> None:
    while process_alive(watched) and process_group_members(group):
        time.sleep(POLL_S)
    if process_group_members(group):
        end_process_group(group, timeout_s=float(os.environ.get(GRACE_ENV, "20")))


def main(argv: list[str]) -> int:
    watched, group = int(argv[0]), int(argv[1])
    if os.fork() > 0:
        return 0  # the first child returns at once; the guard is the grandchild, no longer anyone's child
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    watch(watched, group)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
