"""`python -m fused_rnn` / `fused-rnn`: a short side-by-side of every cell,
fused_rnn against torch.nn, on this machine: the time of each and the largest
difference between their outputs (and input gradients when training)."""

import argparse
import json
import sys

import torch

from . import benchmark


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fused-rnn",
        description="Compare fused_rnn with torch.nn (speed and parity) on this machine.",
    )
    parser.add_argument("--device", default=_default_device(), help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", metavar="FILE", help="also write the rows and the environment as JSON")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    env = benchmark.environment(args.device)
    print("fused_rnn vs torch.nn on", env.get("gpu", env["processor"]), f"(torch {env['torch']})")
    rows = []
    for cell in benchmark.CELLS:
        for training in (False, True):
            config = benchmark.Config(
                cell, args.batch, args.hidden_size, args.seq_len, dtype=args.dtype,
                device=args.device, training=training,
            )
            rows.append(benchmark.run(config, repeats=args.repeats))
            print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    print(benchmark.format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
