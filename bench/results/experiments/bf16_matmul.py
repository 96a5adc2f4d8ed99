"""One-off: is bf16 native or emulated on this CPU? A 1024x1024 matmul in float32 and in bfloat16, best of 5 after
a warm-up, on the threads torch uses here. Decides `train.bf16: auto` (docs/architecture.md, "bf16 on CPU")."""
import time
from pathlib import Path

import torch

flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("flags")), [])
print("cpu flags:", " ".join(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx2"))))
print("torch", torch.__version__, "threads", torch.get_num_threads())
timings = {}
for dtype in (torch.float32, torch.bfloat16):
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    timings[dtype] = best * 1000
    print(f"{dtype}: {best * 1000:.1f} ms")
print(f"bf16 / fp32 time: {timings[torch.bfloat16] / timings[torch.float32]:.1f}x")
