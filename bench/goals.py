"""The GPU speed goals of the kernel issues, checked against benchmark JSON
written by `fused-rnn bench --json` (bench/device_check.sh writes
bench/results/<card>.json, <card>-bidir.json and <card>-general.json).

    python bench/goals.py bench/results/<card>.json [--bidir FILE] [--general FILE]

One line per goal: PASS or MISS, how many rows it covers, and the worst row.
A goal with no rows in the files is reported as NO DATA, never as a pass.
Exit status: 0 when every goal with data passes, 1 otherwise.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable, List


@dataclass
class Goal:
    name: str
    source: str  # "grid", "bidir" or "general"
    applies: Callable[[dict], bool]
    # ("speedup", minimum) or ("fused_us_per_step", maximum)
    metric: str
    bound: Callable[[dict], float]


def _one_layer_grid(row):
    return (row["num_layers"] == 1 and not row["bidirectional"] and row["seq_len"] == 256
            and row["cell"] in ("LSTM", "GRU") and row["input_size"] == row["hidden_size"])


def _fp16_bound(row):
    # cuDNN has a persistent kernel for float16 LSTM at batch 8 (issue 4).
    return 1.0 if (row["cell"] == "LSTM" and row["batch"] == 8) else 4.0


GOALS = [
    Goal("forward 4x cuDNN, fp32 and bf16, B<=64, H 256-1024", "grid",
         lambda r: _one_layer_grid(r) and not r["training"] and r["batch"] <= 64
         and r["dtype"] in ("float32", "bfloat16"), "speedup", lambda r: 4.0),
    Goal("forward fp16: 4x cuDNN, 1.0x where cuDNN is persistent (LSTM B=8)", "grid",
         lambda r: _one_layer_grid(r) and not r["training"] and r["batch"] <= 64
         and r["dtype"] == "float16", "speedup", _fp16_bound),
    Goal("forward per-step latency <= 3 us at B<=8, H<=512, every dtype", "grid",
         lambda r: _one_layer_grid(r) and not r["training"] and r["batch"] <= 8
         and r["hidden_size"] <= 512, "fused_us_per_step", lambda r: 3.0),
    Goal("forward+backward 3x cuDNN, fp32 and bf16, B<=64, H<=1024", "grid",
         lambda r: _one_layer_grid(r) and r["training"] and r["batch"] <= 64
         and r["hidden_size"] <= 1024 and r["dtype"] in ("float32", "bfloat16"),
         "speedup", lambda r: 3.0),
    Goal("B=256: at least 1.0x cuDNN, every dtype, both modes", "grid",
         lambda r: _one_layer_grid(r) and r["batch"] == 256, "speedup", lambda r: 1.0),
    Goal("2-layer bidirectional LSTM B=64 H=512: 3x cuDNN, forward and fwd+bwd", "bidir",
         lambda r: r["cell"] == "LSTM" and r["num_layers"] == 2 and r["bidirectional"]
         and r["batch"] == 64 and r["hidden_size"] == 512, "speedup", lambda r: 3.0),
    Goal("general path (issue 3): no worse than 1.0x cuDNN anywhere", "general",
         lambda r: True, "speedup", lambda r: 1.0),
]


def _describe(row):
    mode = "fwd+bwd" if row["training"] else "forward"
    return (f"{row['cell']} {row['dtype']} B={row['batch']} H={row['hidden_size']} {mode}: "
            f"{row['speedup']:.2f}x, {row['fused_us_per_step']:.2f} us/step"
            + (f" ({row['kernel']})" if row.get("kernel") else ""))


def check(rows_by_source) -> List[str]:
    """One report line per goal; rows_by_source maps grid/bidir/general to rows."""
    lines = []
    for goal in GOALS:
        rows = [r for r in rows_by_source.get(goal.source, []) if goal.applies(r)]
        if not rows:
            lines.append(f"NO DATA  {goal.name}")
            continue
        if goal.metric == "speedup":
            misses = [r for r in rows if r["speedup"] < goal.bound(r)]
            worst = min(rows, key=lambda r: r["speedup"] / goal.bound(r))
        else:
            misses = [r for r in rows if r[goal.metric] > goal.bound(r)]
            worst = max(rows, key=lambda r: r[goal.metric] / goal.bound(r))
        verdict = "MISS" if misses else "PASS"
        lines.append(f"{verdict:<8} {goal.name}: {len(rows) - len(misses)}/{len(rows)} rows; "
                     f"worst {_describe(worst)}")
    return lines


def _rows(path):
    if not path:
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="JSON of the full grid (fused-rnn bench --preset full)")
    parser.add_argument("--bidir", help="JSON of the 2-layer bidirectional LSTM rows")
    parser.add_argument("--general", help="JSON of the grid with --kernel general")
    args = parser.parse_args(argv)
    lines = check({"grid": _rows(args.grid), "bidir": _rows(args.bidir),
                   "general": _rows(args.general)})
    print("\n".join(lines))
    return 1 if any(line.startswith("MISS") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
