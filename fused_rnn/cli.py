"""The `fused-rnn` command (also `python -m fused_rnn`): benchmark, profile
and explain fused_rnn against torch.nn on this machine, and check the build.

    fused-rnn bench [--preset quick|fastrnns|full] [shape flags] [--json F] [--csv F] [--plot F.png]
    fused-rnn profile [shape flags] [--trace trace.json] [--nvtx]
    fused-rnn explain [shape flags]
    fused-rnn check [--device cpu|cuda]

With no subcommand it runs `bench --preset quick`.
"""

import argparse
import contextlib
import csv
import json
import os
import sys
import time

import torch

from . import benchmark, build_info, paths

CELLS = list(benchmark.CELLS)
DTYPES = ["float32", "float64", "bfloat16", "float16"]
MODES = {"forward": (False,), "train": (True,), "both": (False, True)}


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------ presets
def preset_grid(name, device):
    """Lists of values per axis for a preset, on this device."""
    gpu = device.startswith("cuda")
    if name == "quick":
        return dict(cell=CELLS, batch=[8, 64] if gpu else [1, 32], hidden_size=[256],
                    input_size=[None], seq_len=[256 if gpu else 100], num_layers=[1],
                    bidirectional=[False], dtype=["float32"], mode="both")
    if name == "fastrnns":
        return dict(cell=CELLS, batch=[64], hidden_size=[512], input_size=[512],
                    seq_len=[100], num_layers=[1], bidirectional=[False],
                    dtype=["float32"], mode="both")
    if name == "full":
        return dict(cell=["LSTM", "GRU"], batch=[1, 8, 64, 256],
                    hidden_size=[256, 512, 1024], input_size=[None],
                    seq_len=[256 if gpu else 100], num_layers=[1], bidirectional=[False],
                    dtype=["float32", "bfloat16", "float16"] if gpu else ["float32"],
                    mode="both")
    raise ValueError(name)


PRESETS = ("quick", "fastrnns", "full")


# ------------------------------------------------------------------- parsing
def _shape_flags(parser, many):
    """Flags naming one configuration (`many`: lists, for bench)."""
    nargs = "+" if many else None
    parser.add_argument("--cell", nargs=nargs, choices=CELLS, help="cell type(s)")
    parser.add_argument("--batch", type=int, nargs=nargs, help="batch size(s)")
    parser.add_argument("--hidden-size", type=int, nargs=nargs, help="hidden size(s)")
    parser.add_argument("--input-size", type=int, nargs=nargs, help="input size(s) (default: hidden size)")
    parser.add_argument("--seq-len", type=int, nargs=nargs, help="sequence length(s)")
    parser.add_argument("--layers", type=int, nargs=nargs, dest="num_layers", help="number of layers")
    parser.add_argument("--bidirectional", action="store_true", help="bidirectional layers")
    parser.add_argument("--packed", action="store_true",
                        help="variable-length sequences as a PackedSequence (lengths from the "
                             "sequence length down to half of it)")
    parser.add_argument("--dtype", nargs=nargs, choices=DTYPES, help="dtype(s)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--kernel", choices=paths.PATHS, default=None,
                        help="CUDA kernels: auto (default), persistent (wherever they fit), "
                             "stepwise (the persistent kernels, one launch per step) or general "
                             "(per-step GEMMs); see fused_rnn.set_kernel_path")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fused-rnn",
        description="Benchmark, profile and explain fused_rnn against torch.nn on this machine.",
    )
    sub = parser.add_subparsers(dest="command")

    bench = sub.add_parser("bench", help="time fused_rnn and torch.nn side by side, with parity")
    bench.add_argument("--preset", choices=PRESETS, default=None,
                       help="a ready grid (default: quick; flags override its axes)")
    _shape_flags(bench, many=True)
    bench.add_argument("--mode", choices=list(MODES), default=None,
                       help="forward (no_grad), train (forward+backward) or both")
    bench.add_argument("--tf32", action="store_true",
                       help="float32 with torch's default TF32 flags on both sides (cuDNN's RNNs "
                            "and fused_rnn's may use TF32; default: TF32 off on both sides)")
    bench.add_argument("--proj-size", type=int, default=0,
                       help="LSTM's proj_size (LSTM cells only; default 0: none)")
    bench.add_argument("--repeats", type=int, default=10, help="timed runs per side (median)")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--json", metavar="FILE", help="write rows and environment as JSON")
    bench.add_argument("--csv", metavar="FILE", help="write rows as CSV")
    bench.add_argument("--plot", metavar="FILE.png", help="speed-up heat maps and per-step latency")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")

    profile = sub.add_parser("profile", help="one configuration under torch.profiler")
    _shape_flags(profile, many=False)
    profile.add_argument("--training", action="store_true", help="forward + backward")
    profile.add_argument("--trace", metavar="FILE.json", default="fused_rnn_trace.json",
                         help="Chrome trace to write (default: %(default)s)")
    profile.add_argument("--iterations", type=int, default=3)
    profile.add_argument("--nvtx", action="store_true",
                         help="also emit NVTX ranges (for Nsight Systems)")

    explain = sub.add_parser("explain", help="which kernel path a shape takes, and this build")
    _shape_flags(explain, many=False)
    explain.add_argument("--proj-size", type=int, default=0,
                         help="LSTM's proj_size (default 0: none)")

    check = sub.add_parser("check", help="parity self-test of this build against torch.nn")
    check.add_argument("--device", default=None)
    check.add_argument("--kernel", choices=paths.PATHS, default=None,
                       help="CUDA kernels to check (default: persistent, stepwise and general "
                            "in turn, then general and stepwise replayed from CUDA graphs); the "
                            "CPU has one path")
    return parser


def _fail(parser, message):
    parser.error(message)


def _check_proj_size(parser, proj, cells, hidden_sizes):
    """--proj-size: positive, for LSTMs, below every hidden size (as torch.nn
    requires of proj_size)."""
    if not proj:
        return
    _positive(parser, "--proj-size", proj)
    if any(c != "LSTM" for c in cells):
        _fail(parser, "--proj-size takes --cell LSTM only")
    if any(proj >= h for h in hidden_sizes):
        _fail(parser, "--proj-size must be smaller than every --hidden-size")


def _resolve_device(parser, device):
    device = device or _default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail(parser, f"--device {device}: no CUDA device is available (allowed here: cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        _fail(parser, f"--device {device}: allowed values are cpu, cuda, cuda:N")
    return device


def _single(args, name, default):
    value = getattr(args, name)
    return default if value is None else value


def _positive(parser, flag, values):
    for v in values if isinstance(values, list) else [values]:
        if v is not None and v <= 0:
            _fail(parser, f"{flag} must be positive, got {v}")


# ------------------------------------------------------------------- bench
def bench_configs(args, device):
    grid = preset_grid(args.preset or "quick", device)
    for axis in ("cell", "batch", "hidden_size", "input_size", "seq_len", "num_layers", "dtype"):
        value = getattr(args, axis)
        if value is not None:
            grid[axis] = value
    if args.bidirectional:
        grid["bidirectional"] = [True]
    if args.mode is not None:
        grid["mode"] = args.mode
    configs = []
    for dtype in grid["dtype"]:
        for cell in grid["cell"]:
            for hidden in grid["hidden_size"]:
                for input_size in grid["input_size"]:
                    for batch in grid["batch"]:
                        for seq_len in grid["seq_len"]:
                            for layers in grid["num_layers"]:
                                for bidirectional in grid["bidirectional"]:
                                    for training in MODES[grid["mode"]]:
                                        configs.append(benchmark.Config(
                                            cell, batch, hidden, seq_len, input_size,
                                            layers, bidirectional, dtype, device, training,
                                            args.packed, args.tf32 and dtype == "float32",
                                            args.proj_size))
    return configs


def _progress(i, total, config, row, enabled):
    if not enabled:
        return
    width = 24
    done = int(width * i / total)
    label = (f"{config.cell} {'train' if config.training else 'fwd'} {config.dtype} "
             f"B={config.batch} H={config.hidden_size}")
    tail = f"  {row['speedup']:.2f}x" if row else ""
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total} {label}{tail}\033[K")
    if i == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_bench(args, parser):
    device = _resolve_device(parser, args.device)
    for flag, name in (("--batch", "batch"), ("--hidden-size", "hidden_size"),
                       ("--input-size", "input_size"), ("--seq-len", "seq_len"),
                       ("--layers", "num_layers"), ("--repeats", "repeats")):
        _positive(parser, flag, getattr(args, name))
    if args.plot:
        _require_matplotlib(parser)
    configs = bench_configs(args, device)
    _check_proj_size(parser, args.proj_size, [c.cell for c in configs],
                     [c.hidden_size for c in configs])
    env = environment_report(device)
    print(_environment_line(env))
    rows = []
    show = not args.no_progress and sys.stderr.isatty()
    failed = 0
    for i, config in enumerate(configs):
        _progress(i, len(configs), config, None, show)
        try:
            row = benchmark.run(config, repeats=args.repeats, warmup=args.warmup)
        except Exception as error:  # recorded (NaN times, the error), the grid goes on
            row = benchmark.failed_row(config, error)
            failed += 1
            print(f"FAILED {benchmark.format_table([row]).splitlines()[-1]}: {row['error']}",
                  file=sys.stderr, flush=True)
        rows.append(row)
        _progress(i + 1, len(configs), config, row, show)
        if args.json:  # after every row: a run cut short keeps what it measured
            _write_json(args.json, env, rows, complete=i + 1 == len(configs))
    print(benchmark.format_table(rows))
    if args.json:
        print(f"JSON: {args.json}")
    if args.csv:
        write_csv(args.csv, rows, env)
        print(f"CSV: {args.csv}")
    if args.plot:
        write_plot(args.plot, rows, env)
        print(f"plot: {args.plot}")
    if failed:
        print(f"{failed} of {len(configs)} configurations failed", file=sys.stderr)
        return 1
    return 0


def _write_json(path, env, rows, complete):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": env, "complete": complete, "rows": rows}, f, indent=1)
    os.replace(tmp, path)


def environment_report(device):
    env = benchmark.environment(device)
    env["fused_rnn"] = build_info.summary()
    return env


def _environment_line(env):
    where = env.get("gpu", env["processor"])
    line = f"fused_rnn vs torch.nn on {where} (torch {env['torch']}"
    if "cuda" in env:
        line += f", CUDA {env['cuda']}, cuDNN {env['cudnn']}"
    return line + f", {env['threads']} CPU threads)"


def write_csv(path, rows, env):
    # every row's keys (a failed row has "error", a timed one more fields)
    fields = list(dict.fromkeys(k for row in rows for k in row)) + ["device_name",
                                                                   "torch_version"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "device_name": env.get("gpu", env["processor"]),
                             "torch_version": env["torch"]})


def _require_matplotlib(parser):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _fail(parser, "--plot needs matplotlib: pip install matplotlib")


def write_plot(path, rows, env):
    """One heat map of speed-ups (batch x hidden) per (cell, dtype, mode), and
    per-step latency against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in rows:
        key = (r["cell"], r["dtype"], "train" if r["training"] else "forward")
        groups.setdefault(key, []).append(r)
    keys = sorted(groups)
    cols = min(4, len(keys))
    heat_rows = (len(keys) + cols - 1) // cols
    fig = plt.figure(figsize=(4.2 * cols, 3.4 * (heat_rows + 1)))
    for index, key in enumerate(keys):
        ax = fig.add_subplot(heat_rows + 1, cols, index + 1)
        group = groups[key]
        batches = sorted({r["batch"] for r in group})
        hiddens = sorted({r["hidden_size"] for r in group})
        grid = [[float("nan")] * len(batches) for _ in hiddens]
        for r in group:
            grid[hiddens.index(r["hidden_size"])][batches.index(r["batch"])] = r["speedup"]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=max(2.0, max(r["speedup"] for r in group)),
                          origin="lower", aspect="auto")
        for y, line in enumerate(grid):
            for x, value in enumerate(line):
                if value == value:
                    ax.text(x, y, f"{value:.2f}x", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_yticks(range(len(hiddens)), [str(h) for h in hiddens])
        ax.set_xlabel("batch")
        ax.set_ylabel("hidden")
        ax.set_title(f"{key[0]} {key[2]} {key[1]}: speed-up", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    ax = fig.add_subplot(heat_rows + 1, 1, heat_rows + 1)
    for key in keys:
        by_batch = sorted(groups[key], key=lambda r: r["batch"])
        hidden = max(r["hidden_size"] for r in by_batch)
        line = [r for r in by_batch if r["hidden_size"] == hidden]
        label = f"{key[0]} {key[2]} {key[1]} H={hidden}"
        ax.plot([r["batch"] for r in line], [r["fused_us_per_step"] for r in line], "o-",
                label="fused " + label)
        ax.plot([r["batch"] for r in line], [r["torch_us_per_step"] for r in line], "x--",
                label="torch.nn " + label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("microseconds per step")
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(_environment_line(env), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ profile
def run_profile(args, parser):
    device = _resolve_device(parser, args.device)
    config = benchmark.Config(
        _single(args, "cell", "LSTM"), _single(args, "batch", 32),
        _single(args, "hidden_size", 256), _single(args, "seq_len", 100),
        args.input_size, _single(args, "num_layers", 1), args.bidirectional,
        _single(args, "dtype", "float32"), device, args.training, args.packed)
    for flag, value in (("--batch", config.batch), ("--hidden-size", config.hidden_size),
                        ("--seq-len", config.seq_len), ("--iterations", args.iterations)):
        _positive(parser, flag, value)
    _, fused = benchmark.make_pair(config)
    x, grad = benchmark.make_inputs(config)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(2):
        benchmark.step(fused, x, grad, config.training)
    benchmark.synchronize(device)
    nvtx = torch.autograd.profiler.emit_nvtx() if args.nvtx and device.startswith("cuda") else None
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        if nvtx:
            nvtx.__enter__()
        start = time.perf_counter()
        for _ in range(args.iterations):
            benchmark.step(fused, x, grad, config.training)
        benchmark.synchronize(device)
        elapsed = (time.perf_counter() - start) / args.iterations
        if nvtx:
            nvtx.__exit__(None, None, None)
    prof.export_chrome_trace(args.trace)
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(_environment_line(environment_report(device)))
    print(f"{config.cell} {'forward+backward' if config.training else 'forward'} "
          f"{config.dtype} B={config.batch} H={config.hidden_size} I={config.input_size} "
          f"T={config.seq_len} layers={config.num_layers}"
          f"{' bidirectional' if config.bidirectional else ''}"
          f"{' packed' if config.packed else ''} on {device}")
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    phases = {e.key: e for e in prof.key_averages() if e.key.startswith("fused_rnn::")}
    if phases:
        print("fused_rnn phases (CPU time per iteration):")
        for name, event in sorted(phases.items()):
            print(f"  {name:<32} {event.cpu_time_total / 1e3 / args.iterations:9.3f} ms")
    print(f"wall time per iteration: {elapsed * 1e3:.3f} ms = "
          f"{elapsed * 1e6 / config.seq_len:.2f} us per step")
    print(f"Chrome trace: {args.trace}")
    return 0


# ------------------------------------------------------------------ explain
def run_explain(args, parser):
    device = _resolve_device(parser, args.device)
    cell = _single(args, "cell", "LSTM")
    hidden = _single(args, "hidden_size", 256)
    batch = _single(args, "batch", 32)
    seq_len = _single(args, "seq_len", 100)
    input_size = args.input_size or hidden
    dtype = _single(args, "dtype", "float32")
    _positive(parser, "--hidden-size", hidden)
    _positive(parser, "--batch", batch)
    proj = args.proj_size
    _check_proj_size(parser, proj, [cell], [hidden])
    gates = {"LSTM": 4, "GRU": 3}.get(cell, 1)
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    weight_bytes = gates * hidden * hidden * element
    info = build_info.summary()
    print(f"{cell}, B={batch}, I={input_size}, H={hidden}"
          + (f", proj_size={proj}" if proj else "") + f", T={seq_len}, {dtype}, on {device}"
          + (", packed sequences" if args.packed else "")
          + (", bidirectional" if args.bidirectional else ""))
    print()
    print("Kernel path:")
    if device == "cpu":
        print("  CPU sequence kernel (csrc/sequence + csrc/cpu), one op per layer and direction"
              + (" (a layer's two directions in one op, one after the other)"
                 if args.bidirectional else "") + ":")
        print("  1. input projection x @ W_ih^T as GEMMs over many steps (blocks of ~2 MB "
              "in inference, all steps at once when training)")
        print(f"  2. per step: h @ W_hh^T as one GEMM ({batch} x {gates * hidden} x "
              f"{proj or hidden}), then one fused pointwise pass over {batch} x {hidden} units, "
              f"parallel over rows, vectorised ({build_info.cpu_vector_path()})"
              + (f", then the projection as one GEMM ({batch} x {proj} x {hidden})"
                 if proj else ""))
        print(f"  3. backward: per step the pointwise pass and one GEMM with W_hh"
              + (" and one with W_hr" if proj else "") + ", then the weight gradients as "
              f"large GEMMs over all {batch * seq_len} rows")
        print(f"  GEMMs: {paths.explain_cpu_gemm()} (fused_rnn.set_cpu_gemm or "
              f"FUSED_RNN_CPU_GEMM: auto | aten)")
        print(f"  threads: {torch.get_num_threads()}")
    else:
        props = torch.cuda.get_device_properties(device)
        on_chip = props.multi_processor_count * _shared_memory_per_sm(props)
        torch_dtype = getattr(torch, dtype)
        weights = "W_hh W_hr (the folded recurrent weight)" if proj else "W_hh"
        print(f"  {weights} is {weight_bytes / 2**20:.2f} MiB; on-chip memory of this GPU "
              f"({props.name}): {props.multi_processor_count} SMs x "
              f"{_shared_memory_per_sm(props) // 1024} KiB = {on_chip / 2**20:.1f} MiB")
        print(f"  kernel choice: {paths.get_kernel_path()} (fused_rnn.set_kernel_path or "
              f"FUSED_RNN_KERNEL_PATH: auto | persistent | stepwise | general)")
        print(f"  CUDA graphs of the general path: {paths.get_cuda_graphs()} "
              f"(fused_rnn.set_cuda_graphs or FUSED_RNN_CUDA_GRAPHS: auto | always | off)")
        for what, backward in (("forward", False), ("backward", True)):
            text = paths.explain_kernel_path(cell, hidden, batch, torch_dtype, device,
                                             packed=args.packed, proj=proj > 0,
                                             backward=backward,
                                             bidirectional=args.bidirectional)
            print(f"  {what}: {text}")
        print("  every path: the input projection of every step as one GEMM first; in "
              "backward the weight gradients as large GEMMs after the recurrence")
        if dtype == "float32":
            print(f"  TF32: {tf32_flags_line((props.major, props.minor))}")
    print()
    print("This build:")
    for key, value in info.items():
        print(f"  {key}: {value}")
    return 0


def tf32_flags_line(capability=None):
    """torch's TF32 flags as they bear on fused_rnn's float32 products on
    CUDA, in words, on a GPU of compute capability `capability` (major,
    minor) if given: before 8.0 there is no TF32."""
    if capability is not None and tuple(capability) < (8, 0):
        return (f"this GPU (compute capability {capability[0]}.{capability[1]}) has no TF32: "
                "float32 multiplies exactly in every kernel, whatever torch's TF32 flags say")
    cudnn = torch.backends.cudnn
    if cudnn.enabled and cudnn.is_available():
        rnn = (f"torch.backends.cudnn.allow_tf32 = {cudnn.allow_tf32} (as torch.nn's cuDNN "
               "RNNs, past 8 sequences)")
    else:
        rnn = (f"cuDNN disabled: torch.backends.cuda.matmul.allow_tf32 = "
               f"{torch.backends.cuda.matmul.allow_tf32} (as torch.nn's RNNs without cuDNN, "
               "past 8 sequences)")
    return (f"the persistent and stepwise kernels follow {rnn}; the cuBLAS GEMMs (the general "
            f"path's per-step products, the input projection, the weight gradients) "
            f"torch.backends.cuda.matmul.allow_tf32 = {torch.backends.cuda.matmul.allow_tf32}")


def _shared_memory_per_sm(props):
    return getattr(props, "shared_memory_per_multiprocessor", 0) or 228 * 1024


# -------------------------------------------------------------------- check
CHECK_CASES = [
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("LSTM proj_size", dict(proj_size=3, num_layers=2)),
    ("LSTM packed", dict(bidirectional=True)),
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("GRU packed", dict(bidirectional=True)),
    ("RNN tanh", dict(nonlinearity="tanh", num_layers=2)),
    ("RNN relu", dict(nonlinearity="relu", bidirectional=True)),
    ("RNN packed", dict(nonlinearity="tanh", bidirectional=True)),
    ("LSTMCell", {}),
    ("GRUCell", {}),
    ("RNNCell", {}),
]
# The lengths of the packed cases' three sequences (unsorted).
CHECK_LENGTHS = [2, 4, 1]


def parity_errors(device, dtype=torch.float64, seed=0):
    """(name, max abs difference from torch.nn over outputs, states and every
    gradient) for each case, in float64; weights and inputs from `seed`."""
    from torch import nn

    from . import modules

    results = []
    for name, kwargs in CHECK_CASES:
        kind = name.split()[0]
        torch.manual_seed(seed)
        reference = getattr(nn, kind)(5, 7, **kwargs).to(device, dtype)
        fused = getattr(modules, kind)(5, 7, **kwargs).to(device, dtype)
        fused.load_state_dict(reference.state_dict())
        shape = (3, 5) if kind.endswith("Cell") else (4, 3, 5)
        x = torch.randn(shape, device=device, dtype=dtype)
        errors = []
        for module in (reference, fused):
            xi = x.clone().requires_grad_(True)
            inp = (nn.utils.rnn.pack_padded_sequence(xi, CHECK_LENGTHS, enforce_sorted=False)
                   if name.endswith("packed") else xi)
            flat = [t for t in torch.utils._pytree.tree_leaves(module(inp))
                    if t.is_floating_point()]
            weights = [torch.linspace(-1, 1, t.numel(), device=device, dtype=dtype).view_as(t)
                       for t in flat]
            loss = sum((t * w).sum() for t, w in zip(flat, weights))
            grads = torch.autograd.grad(loss, [xi, *module.parameters()])
            errors.append([t.detach() for t in flat] + list(grads))
        error = max((a - b).abs().max().item() for a, b in zip(*errors))
        results.append((name, error))
    return results + higher_order_errors(device, dtype, seed)


def higher_order_errors(device, dtype=torch.float64, seed=0):
    """(name, max abs difference from torch.nn) of a gradient penalty's
    gradients (create_graph) through a packed bidirectional LSTM and of a
    forward-mode derivative (torch.func.jvp) through a two-layer GRU;
    torch.nn without cuDNN, which has neither."""
    from torch import nn

    from . import modules

    results = []
    for name, kind, kwargs in (("LSTM grad-grad", "LSTM", dict(bidirectional=True)),
                               ("GRU jvp", "GRU", dict(num_layers=2))):
        torch.manual_seed(seed)
        reference = getattr(nn, kind)(5, 7, **kwargs).to(device, dtype)
        fused = getattr(modules, kind)(5, 7, **kwargs).to(device, dtype)
        fused.load_state_dict(reference.state_dict())
        x = torch.randn(4, 3, 5, device=device, dtype=dtype)
        v = torch.randn_like(x)
        values = []
        for module in (reference, fused):
            with torch.backends.cudnn.flags(enabled=False):
                if name.endswith("jvp"):
                    values.append(torch.func.jvp(lambda xx, m=module: m(xx)[0], (x,), (v,)))
                    continue
                xi = x.clone().requires_grad_(True)
                packed = nn.utils.rnn.pack_padded_sequence(xi, CHECK_LENGTHS,
                                                           enforce_sorted=False)
                out = module(packed)[0].data
                params = [xi, *module.parameters()]
                first = torch.autograd.grad(out.pow(2).sum(), params, create_graph=True)
                values.append(torch.autograd.grad(sum(g.pow(2).sum() for g in first), params))
        results.append((name, max((a - b).abs().max().item() for a, b in zip(*values))))
    return results


# The float32 cases' tolerance: their outputs and gradients are O(1-10) and
# the two sides round differently (about 1e-6 here); a wrong kernel is off
# by O(0.1) or more.
FLOAT32_TOLERANCE = 1e-4


def run_check(args, parser):
    """Every case on the CPU; on CUDA on every kernel path in turn (or the
    one --kernel names), so that each kernel of the build is checked, and
    the general path and the stepwise launches once more with their loops
    replayed from CUDA graphs (captured at the first call, replayed with
    other weights and inputs at the second); the persistent kernels also in
    float32 (the cluster exchange's kernels have no float64)."""
    device = _resolve_device(parser, args.device)
    tolerance = 1e-10
    failed = 0
    print(f"fused_rnn parity self-test on {device} (float64, tolerance {tolerance:g}"
          + ("" if device == "cpu" else
             f"; the persistent kernels also in float32, tolerance {FLOAT32_TOLERANCE:g}")
          + ")")
    # (kernel path, graphed)
    passes = ([(None, False)] if device == "cpu" or args.kernel is not None
              else [("persistent", False), ("stepwise", False), ("general", False),
                    ("general", True), ("stepwise", True)])
    for kernel, graphed in passes:
        context = contextlib.ExitStack()
        seeds = (0,)
        if graphed:
            print(f" {kernel} kernels replayed from CUDA graphs:")
            context.enter_context(paths.kernel_path(kernel))
            context.enter_context(paths.cuda_graphs("always"))
            seeds = (0, 1)
        elif kernel:
            print(f" {kernel} kernels:")
            context.enter_context(paths.kernel_path(kernel))
        with context:
            for seed in seeds:
                for name, error in parity_errors(device, seed=seed):
                    ok = error <= tolerance
                    failed += not ok
                    print(f"  {'ok  ' if ok else 'FAIL'} {name:<16} max |fused - torch.nn| = "
                          f"{error:.2e}" + (f" (seed {seed})" if len(seeds) > 1 else ""))
            if device != "cpu" and (kernel or args.kernel) == "persistent" and not graphed:
                # float32: the kernels that float64 never takes (on Hopper
                # the cluster exchange's), against torch.nn (cuDNN) in
                # float32, TF32 off on both sides
                flags = torch.backends.cudnn, torch.backends.cuda.matmul
                old = [f.allow_tf32 for f in flags]
                try:
                    for f in flags:
                        f.allow_tf32 = False
                    for name, error in parity_errors(device, dtype=torch.float32):
                        ok = error <= FLOAT32_TOLERANCE
                        failed += not ok
                        print(f"  {'ok  ' if ok else 'FAIL'} {name:<16} max |fused - torch.nn| = "
                              f"{error:.2e} (float32)")
                finally:
                    for f, value in zip(flags, old):
                        f.allow_tf32 = value
    print("all cells match torch.nn" if not failed else f"{failed} case(s) differ from torch.nn")
    return 1 if failed else 0


# --------------------------------------------------------------------- main
def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["bench", *argv]
    args = parser.parse_args(argv)
    handlers = {"bench": run_bench, "profile": run_profile, "explain": run_explain,
                "check": run_check}
    if getattr(args, "kernel", None) is None:
        return handlers[args.command](args, parser)
    with paths.kernel_path(args.kernel):
        return handlers[args.command](args, parser)


if __name__ == "__main__":
    sys.exit(main())
