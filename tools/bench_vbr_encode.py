"""Device-side cost of a variable-rate codec: ``Codec.encode`` of one 64×64 demo validation image, 1 thread,
a fixed-rate codec against a variable-rate one at its middle level, interleaved, median of 300 calls each.

    python tools/bench_vbr_encode.py runs/demo-per-beta/bottleneck/beta_1/codec.pt runs/demo-hues/bottleneck/levels/codec.pt
"""
import statistics
import sys
import time

import torch

from mtfc.codec import load_codec
from mtfc.data import build_dataset

torch.set_num_threads(1)
fixed, variable = (load_codec(p) for p in sys.argv[1:3])
x = build_dataset({"type": "bundled", "root": "runs/demo-hues/data", "image_size": 64}, "val", train=False)[0][0][None]
calls = {"fixed": lambda: fixed.encode(x), "variable": lambda: variable.encode(x, level=variable.levels // 2)}
times: dict[str, list[float]] = {k: [] for k in calls}
for i in range(330):
    for name, call in calls.items():
        t = time.perf_counter()
        call()
        if i >= 30:  # warm-up
            times[name].append(time.perf_counter() - t)
ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
print(f"encode ms: fixed {ms['fixed']:.3f}, variable {ms['variable']:.3f}, ratio {ms['variable'] / ms['fixed']:.3f}; "
      f"g_a parameters {sum(p.numel() for p in fixed.g_a.parameters())} vs "
      f"{sum(p.numel() for p in variable.g_a.parameters())}")
