"""Training beside a loaded vLLM on 2 cores: torch's default threads (one per core) vs one thread.

`tuneloop serve` (real vLLM, both cores: serving.cpu_reserved_cores 0 on 2 cores) with 2 clients sending sentiment
requests one after another; meanwhile the colours task's poisoned champion recipe is trained for 3 steps (batch
8) in a fresh process, with OMP_NUM_THREADS unset (torch uses 2) or 1, in the order A B B A. Printed: seconds of the
`finetune` call alone (model load included), per run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_faults import Load, ServeProcess
from bench.bench_reliability import prepared
from bench.colours import COLOURS_TASK, add_colours_sets

TRAIN = """
import sys, time
from tuneloop.config import parse_config
from tuneloop.retrain.finetune import finetune
from tuneloop.store import Store
from pathlib import Path
root = Path(sys.argv[1])
config = parse_config((root / "tuneloop.yaml").read_text(), config_dir=root)
store = Store(config.resolved_database_url)
started = time.perf_counter()
finetune(config, store, "colours", dataset="colours/poisoned", max_steps=3, progress=False)
print(f"SECONDS {time.perf_counter() - started:.1f}")
"""


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="train-beside-")) / "scene"
    config, store, key = prepared(root, extra_tasks=COLOURS_TASK)
    add_colours_sets(store, config.data_path)
    serve = ServeProcess(root / "tuneloop.yaml", f"http://127.0.0.1:{config.serving.gateway_port}", root / "serve.log")
    serve.start()
    try:
        with Load(serve.url, key, 2):
            time.sleep(10)
            for label, threads in (("A default", None), ("B 1 thread", "1"), ("B 1 thread", "1"),
                                   ("A default", None)):
                env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
                if threads:
                    env["OMP_NUM_THREADS"] = threads
                out = subprocess.run([sys.executable, "-c", TRAIN, str(root)], env=env, capture_output=True,
                                     text=True, timeout=3600)
                seconds = [line for line in out.stdout.splitlines() if line.startswith("SECONDS")]
                print(label, seconds or out.stderr[-500:], flush=True)
    finally:
        serve.stop()
        store.close()


if __name__ == "__main__":
    main()
