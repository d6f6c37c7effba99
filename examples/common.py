"""Plumbing shared by the examples: flags, twin models, step timing, the
comparison table and the machine-readable RESULT line.

Every example trains one model twice, once built from fused_rnn's modules and
once from torch.nn's, from the same initial weights and on the same batches in
the same order. The two runs differ only in the RNN kernels, so their quality
metrics should agree (up to float rounding that training may amplify) and
their timings compare the kernels.
"""

import argparse
import json
import math
import statistics
import time
from contextlib import contextmanager

import torch

import fused_rnn

# fused_rnn and torch.nn expose modules under the same names (LSTM, GRU, RNN,
# LSTMCell, ...) with the same signatures, so a model can take either
# namespace as its "backend" and look the classes up on it.
BACKENDS = (("fused", fused_rnn), ("torch", torch.nn))


def make_parser(description, *, steps, hidden_size, batch_size, seq_len, tiny):
    """The flags every example shares. `tiny` holds the defaults --tiny
    switches to (a few steps at a toy size, for the tests); flags given
    explicitly still win over them."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=steps, help="training steps per backend")
    parser.add_argument("--hidden-size", type=int, default=hidden_size,
                        help="hidden units per direction")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help="sequences per training step")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="sequence length T")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both models train")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the initial weights and the data")
    parser.add_argument("--tiny", action="store_true",
                        help="toy size and a few steps (what the tests run): " + ", ".join(
                            f"{k}={v}" for k, v in tiny.items()))
    parser.set_defaults(_tiny_defaults=tiny)
    return parser


def parse_args(parser, argv=None):
    args, _ = parser.parse_known_args(argv)
    if args.tiny:
        # parse again with the tiny values as defaults, so that e.g.
        # `--tiny --steps 5` keeps its explicit --steps
        parser.set_defaults(**args._tiny_defaults)
    args = parser.parse_args(argv)
    del args._tiny_defaults
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    return args


def twin_models(make, seed, device):
    """{"fused": model, "torch": model}: make(backend) for both backends, with
    identical initial weights."""
    models = {}
    for name, backend in BACKENDS:
        torch.manual_seed(seed)
        models[name] = make(backend).to(device)
    # Same seed alone would give the same weights (the fused modules reuse
    # torch.nn's initialisation), but copying the state_dict makes it so by
    # construction, whatever each model's constructor does with the RNG.
    models["fused"].load_state_dict(models["torch"].state_dict())
    return models


def data_generator(seed):
    """A private CPU generator for the training batches: both backends draw
    the same batches in the same order, whatever else consumes the global RNG."""
    return torch.Generator().manual_seed(seed)


class StepTimer:
    """Wall time of the training steps only (forward, backward, optimizer):
    batch generation and evaluation are left out. CUDA is synchronised so that
    asynchronous kernels are counted in the step that launched them."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = []

    @contextmanager
    def step(self):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - start)

    def summary(self, sequences_per_step):
        """Throughput from the median step, which a busy shared machine
        disturbs much less than the mean (the first steps, which also warm
        up allocators and caches, do not move it either)."""
        median = statistics.median(self.seconds)
        return {
            "train_s": sum(self.seconds),
            "step_ms": 1e3 * median,
            "seq_per_s": sequences_per_step / median,
        }


def describe_machine(device):
    if torch.device(device).type == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _fmt(value):
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def print_table(runs, columns):
    """runs: list of dicts; columns: the keys to print, in order."""
    cells = [[_fmt(run[c]) for c in columns] for run in runs]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def speedups(runs, group_keys=()):
    """fused throughput / torch.nn throughput for each group of runs that
    differ only in backend (e.g. per cell)."""
    out = {}
    for run in runs:
        if run["backend"] != "fused":
            continue
        key = "/".join(str(run[k]) for k in group_keys) or "all"
        torch_run = next(r for r in runs if r["backend"] == "torch"
                         and all(r[k] == run[k] for k in group_keys))
        out[key] = run["seq_per_s"] / torch_run["seq_per_s"]
    return out


def report(example, args, runs, metrics, group_keys=(), extra=None):
    """Print the speed-ups and the final `RESULT {json}` line. `metrics` names
    the quality metrics in each run (lower or higher is better, both
    backends should agree); the tests compare them across backends."""
    ups = speedups(runs, group_keys)
    for key, value in ups.items():
        label = "" if key == "all" else f" {key}"
        print(f"speed-up{label} (fused seq/s / torch.nn seq/s): {value:.2f}x")
    for run in runs:
        for m in metrics:
            if not math.isfinite(run[m]):
                print(f"warning: {run['backend']} {m} is not finite")
    result = {
        "example": example,
        "config": {k: v for k, v in vars(args).items()},
        "device": describe_machine(args.device),
        "metrics": list(metrics),
        "group_keys": list(group_keys),
        "runs": runs,
        "speedup": ups,
    }
    if extra:
        result.update(extra)
    print("RESULT " + json.dumps(result, sort_keys=True))
