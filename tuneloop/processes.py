"""Processes on this machine, read from /proc: whether one is alive (the job reaper and the capture spill's replay
must tell a worker or gateway that died from one that is merely busy), and which belong to a process group or
session (an engine is its group; a Ray node started by the tests is its session)."""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a dead child its parent has not waited for yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def live_members(*, group: int | None = None, session: int | None = None) -> list[int]:
    """Live (not zombie) processes of a process group or of a session."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] in ("Z", "X"):
            continue
        if (group is not None and int(fields[2]) == group) or (session is not None and int(fields[3]) == session):
            members.append(int(stat.parent.name))
    return members
