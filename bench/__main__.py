"""`make bench` / `python -m bench [NAME ...]`: run benchmarks, print their tables, save them with provenance.

`python -m bench report` rewrites the README's tables from the saved results (`--check`: only compare).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

BENCHMARKS = {
    "training": "bench.bench_training",
    "accuracy": "bench.bench_accuracy",
    "budget": "bench.bench_budget",
    "labels": "bench.bench_labels",
    "serving": "bench.bench_serving",
    "gateway": "bench.bench_gateway",
    "adapters": "bench.bench_adapters",
    "lora": "bench.bench_lora",
    "lora_quality": "bench.bench_lora:run_quality",
    "lora_profile": "bench.bench_lora:run_profile",
    "lora_paths": "bench.bench_lora:run_paths",
    "eval": "bench.bench_eval",
    "drift": "bench.bench_drift",
    "drift_timing": "bench.bench_drift:run_timing",
    "retrain": "bench.bench_retrain",
    "reliability": "bench.bench_reliability",
    "faults": "bench.bench_faults",
    "recovery": "bench.bench_recovery",
    "scale": "bench.bench_scale",
    "scheduler": "bench.bench_scheduler",
    "estimate": "bench.bench_estimate",
    "estimate_chat": "bench.bench_estimate_chat",
}


def main() -> None:
    if sys.argv[1:2] == ["report"]:
        from bench.report import main as report

        sys.exit(report(check="--check" in sys.argv[2:]))
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, a smoke run (results go to .cache/bench-quick/, never bench/results/)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    from bench.results import provenance, save_results

    for name in args.names or list(BENCHMARKS):
        started = time.perf_counter()
        meta = provenance(quick=args.quick)
        print(f"== bench {name}{' (quick)' if args.quick else ''}", flush=True)
        module, _, function = BENCHMARKS[name].partition(":")
        tables = getattr(importlib.import_module(module), function or "run")(quick=args.quick)
        seconds = time.perf_counter() - started
        path = save_results(name, tables, meta, seconds=seconds)
        print(f"== bench {name} done in {seconds:.0f} s -> {path}\n", flush=True)


if __name__ == "__main__":
    main()
