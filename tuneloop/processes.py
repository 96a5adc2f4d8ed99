"""Whether a process on this machine is alive, for the job reaper and the capture spill's replay: both must tell
a worker or gateway that died (SIGKILL, the OOM killer) from one that is merely busy."""

from __future__ import annotations

import os


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
