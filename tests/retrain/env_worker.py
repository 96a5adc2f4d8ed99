"""A stand-in for the worker module in tests/retrain/test_runner.py: prints its arguments and thread variables."""

import json
import os
import sys

print(json.dumps({"argv": sys.argv[1:], **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}))
