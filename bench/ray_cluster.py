"""A throwaway Ray cluster on 127.0.0.1 for tests and benches: a head node and, on request, worker nodes, each
started with `ray start` as an operator would, sized for a 2-core, 24 GiB machine, usage stats off.

Every node gets ports of its own (two nodes on one machine would otherwise both claim the dashboard agent's
default port, and the second node's agent fails: its jobs' logs then cannot be read) and runs in a process
session of its own, so `kill_node` ends exactly one node (SIGKILL to its session, as a machine dying would) and
`stop` ends this cluster only, never another Ray on the machine (`ray stop` kills every Ray process it finds).
Ray's job entrypoints start sessions of their own and outlive a killed node: what runs there must notice by
itself (a tuneloop worker does: its job is reaped, its heartbeat says so, it stops).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tuneloop.ports import free_port
from tuneloop.processes import live_members

RAY = Path(sys.executable).parent / "ray"
OBJECT_STORE_BYTES = 200 * 2**20  # Ray's floor is 75 MiB; the jobs here put nothing in it




@dataclass
class RayNode:
    name: str
    session: int  # the process session its `ray start` made: every process of the node but job entrypoints
    agent_port: int  # its dashboard agent's HTTP port: Ray names it as a job's `driver_agent_http_address`
    resources: dict[str, float] = field(default_factory=dict)


class RayUnavailableHere(RuntimeError):
    """Ray is not installed in this environment."""


class ThrowawayRay:
    def __init__(self, *, head_cpus: float = 1) -> None:
        if not RAY.exists():
            raise RayUnavailableHere(f"{RAY} is missing: install tuneloop's [ray] extra (make install does)")
        # Short: Ray's unix sockets live under it, and a socket path may not exceed 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="tlray-", dir="/tmp"))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[RayNode] = []
        self.serve_port: int | None = None  # Serve's proxy port, fixed by the first deployment on this cluster
        self._start("head", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
                             "--include-dashboard=true"], head_cpus, {})

    def _start(self, name: str, role: list[str], cpus: float, resources: dict[str, float]) -> RayNode:
        ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
        command = [str(RAY), "start", *role, "--node-ip-address=127.0.0.1", f"--num-cpus={cpus:g}",
                   f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
                   *(f"{flag}={port}" for flag, port in ports.items())]
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        log = self.temp_dir / f"start-{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
            if process.wait(180) != 0:
                raise RuntimeError(f"ray start ({name}) failed: {log.read_text()[-2000:]}")
        node = RayNode(name=name, session=process.pid, agent_port=ports["--dashboard-agent-listen-port"],
                       resources=dict(resources))
        self.nodes.append(node)
        return node

    def add_node(self, name: str, *, cpus: float = 1, resources: dict[str, float] | None = None) -> RayNode:
        """A worker node joined to the head (each with its own ports and process session)."""
        return self._start(name, [f"--address=127.0.0.1:{self.gcs_port}"], cpus, resources or {})

    def kill_node(self, node: RayNode) -> None:
        """SIGKILL every process of the node, as a machine dying would (the head notices within ~20 s)."""
        _signal_session(node.session, signal.SIGKILL)
        self.nodes.remove(node)

    def kill_raylet(self, node: RayNode) -> None:
        """SIGKILL the node's raylet alone, the process that makes it a node: the head declares the node dead
        (~20 s), its own processes follow, and a job entrypoint running there is orphaned but alive."""
        for pid in session_members(node.session):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if command.endswith(b"/raylet"):
                os.kill(pid, signal.SIGKILL)
        self.nodes.remove(node)

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Until the job API answers and every node has joined."""
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                JobSubmissionClient(self.address).list_jobs()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            _signal_session(node.session, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(session_members(n.session) for n in self.nodes):
            time.sleep(0.3)
        for node in self.nodes:
            _signal_session(node.session, signal.SIGKILL)
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def session_members(session: int) -> list[int]:
    """Live processes of a process session (Ray's workers take process groups of their own, so a node is its
    session, not its group)."""
    return live_members(session=session)


def _signal_session(session: int, signum: int) -> None:
    for pid in session_members(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


@contextlib.contextmanager
def throwaway_ray(*, head_cpus: float = 1) -> Iterator[ThrowawayRay]:
    cluster = ThrowawayRay(head_cpus=head_cpus)
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()
