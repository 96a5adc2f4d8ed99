"""`python -m tuneloop.conductor.worker JOB_ID --config-snapshot PATH [--log WHERE]`: one retraining job in its own
process.

Started by the job runner (retrain/runner.py) with a snapshot of the exact config; runs steps 5-6 of the loop
(tuneloop/conductor/loop.py) to the job's end. Exit status 0 when the job reached a gate decision (promoted or
rejected), 1 when it failed; SIGTERM fails the job with that reason and leaves the champion serving.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from tuneloop.conductor.process import assemble_loop
from tuneloop.retrain.runner import load_config_snapshot
from tuneloop.retrain.worker import Terminated
from tuneloop.store import Store

log = logging.getLogger("tuneloop.worker")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneloop.conductor.worker", description=__doc__)
    parser.add_argument("job", type=int, help="job id")
    parser.add_argument("--config-snapshot", type=Path, required=True, help="config.json written by the runner")
    parser.add_argument("--log", default=None, help="where the runner keeps this process's output (shown by "
                        "`tuneloop jobs show`)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "alembic", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def terminate(_signum: int, _frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    config = load_config_snapshot(args.config_snapshot)
    store = Store(config.resolved_database_url)
    try:
        state = assemble_loop(config, store).run_job(args.job, log_path=args.log,
                                                     on_reaped=lambda: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        store.close()
    log.info("job %s finished: %s", args.job, state)
    return 0 if state in ("promoted", "rejected") else 1


if __name__ == "__main__":
    sys.exit(main())
