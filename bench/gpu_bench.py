"""GPU benchmark grid: LSTM and GRU, one layer, T = 256, I = H, B in
1, 8, 64, 256, H in 256, 512, 1024, float32 (TF32 off on both sides),
bfloat16 and float16, forward under no_grad and forward+backward; fused_rnn
and torch.nn (cuDNN) side by side in one process on one card. Writes
bench/results/<card>.json (and a copy under $OUT when set) and prints the
table.

    python bench/gpu_bench.py [--quick] [--repeats 10]
"""

import argparse
import json
import os
import re
import shutil
import sys

import torch

from fused_rnn import benchmark


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="B in 8, 64 and H = 512 only")
    parser.add_argument("--out", help="JSON file (default: bench/results/<card>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA device")

    batches = [8, 64] if args.quick else [1, 8, 64, 256]
    hiddens = [512] if args.quick else [256, 512, 1024]
    env = benchmark.environment("cuda")
    rows = []
    for dtype in ("float32", "bfloat16", "float16"):
        for cell in ("LSTM", "GRU"):
            for hidden in hiddens:
                for batch in batches:
                    for training in (False, True):
                        config = benchmark.Config(
                            cell, batch, hidden, args.seq_len, dtype=dtype, device="cuda",
                            training=training,
                        )
                        rows.append(benchmark.run(config, repeats=args.repeats))
                        print(benchmark.format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    name = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-").lower()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{name}.json")
    with open(out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    if os.environ.get("OUT"):
        shutil.copy(out, os.environ["OUT"])
    print(f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}")
    print(benchmark.format_table(rows))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
