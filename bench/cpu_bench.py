"""CPU benchmark of the foundation: every cell, fused_rnn vs torch.nn side by
side in one process, forward (no_grad) and forward+backward, at
I = H = 256, T = 100 and B in 1, 32, 256 (B=32 is PyTorch's fastrnns-style
shape). Writes bench/results/cpu-<processor>.json and prints the table.

    python bench/cpu_bench.py [--repeats 10] [--batch 1 32 256]
"""

import argparse
import json
import os
import re
import sys

import torch

from fused_rnn import benchmark


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--cells", nargs="+", default=list(benchmark.CELLS), choices=list(benchmark.CELLS))
    parser.add_argument("--out", help="JSON file (default: bench/results/cpu-<processor>.json)")
    args = parser.parse_args()

    env = benchmark.environment("cpu")
    rows = []
    for batch in args.batch:
        for cell in args.cells:
            for training in (False, True):
                config = benchmark.Config(cell, batch, args.hidden_size, args.seq_len, training=training)
                rows.append(benchmark.run(config, repeats=args.repeats))
                print(benchmark.format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    name = re.sub(r"[^A-Za-z0-9]+", "-", env["processor"]).strip("-").lower()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"cpu-{name}.json")
    with open(out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    print(f"{env['processor']}, {env['threads']} threads, torch {env['torch']}")
    print(benchmark.format_table(rows))
    print(f"written to {out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
