"""A throwaway Postgres 15 cluster on 127.0.0.1 for tests and benches (its server ships in the machine image).

Run as the `postgres` user when we are root (the server refuses root), in a folder outside any private temp tree
so that user can reach it; `stop()` and `start()` let a fault bench take the database away and bring it back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PostgresMissing(RuntimeError):
    """The Postgres 15 server binaries are not installed."""


class ThrowawayPostgres:
    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
            raise PostgresMissing("Postgres 15 server binaries are missing: install the Debian package postgresql-15")
        self.root = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))
        os.chmod(self.root, 0o777)
        self.data = self.root / "data"
        self.user = "postgres" if os.geteuid() == 0 else None
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"postgresql+psycopg://tuneloop@127.0.0.1:{self.port}/postgres"
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "tuneloop", "--auth=trust", "-E", "UTF8")

    def _run(self, *args: str) -> None:
        command = ["runuser", "-u", self.user, "--", *args] if self.user else list(args)
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o",
                  f"-h 127.0.0.1 -p {self.port} -k {self.root}", "start")
        engine = create_engine(self.url)
        deadline = time.time() + 30
        try:
            while True:
                try:
                    with engine.connect():
                        return
                except Exception:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.5)
        finally:
            engine.dispose()

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    server = ThrowawayPostgres()
    try:
        server.start()
        yield server
    finally:
        server.remove()
