"""`make bench` / `python -m bench [NAME ...]`: run benchmarks and print their tables.

Tables are also written to bench/results/NAME.md so the README can quote the last run.
"""

from __future__ import annotations

import argparse
import importlib
import time

BENCHMARKS = {
    "training": "bench.bench_training",
    "accuracy": "bench.bench_accuracy",
    "serving": "bench.bench_serving",
    "lora": "bench.bench_lora",
    "eval": "bench.bench_eval",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    for name in args.names or list(BENCHMARKS):
        started = time.perf_counter()
        print(f"== bench {name}", flush=True)
        module = importlib.import_module(BENCHMARKS[name])
        text = module.run(quick=args.quick)
        from bench.setup import results_dir

        (results_dir() / f"{name}.md").write_text(text)
        print(f"== bench {name} done in {time.perf_counter() - started:.0f} s\n", flush=True)


if __name__ == "__main__":
    main()
