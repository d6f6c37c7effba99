"""Side-by-side timing and parity of fused_rnn against torch.nn, in one
process, on one device: the engine behind `python -m fused_rnn` and the
scripts in bench/.

Timing: random inputs, warm-up, then torch.nn and fused alternate call by
call (so drift of clocks or load hits both), the median of each is reported;
on CUDA every call is bracketed by synchronisation, torch.nn modules are
flatten_parameters()'d and TF32 is off for float32 on both sides (unless a
configuration asks for torch's default TF32 flags: `tf32`).
"""

import contextlib
import dataclasses
import os
import platform
import statistics
import time
import warnings

import torch
from torch import nn

from . import modules, paths

CELLS = {
    "LSTM": (nn.LSTM, modules.LSTM, {}),
    "GRU": (nn.GRU, modules.GRU, {}),
    "RNN_TANH": (nn.RNN, modules.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (nn.RNN, modules.RNN, {"nonlinearity": "relu"}),
}


@dataclasses.dataclass
class Config:
    cell: str
    batch: int
    hidden_size: int
    seq_len: int
    input_size: int | None = None  # defaults to hidden_size
    num_layers: int = 1
    bidirectional: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    training: bool = False  # forward + backward when True, else forward under no_grad
    # variable-length sequences as a PackedSequence (lengths: packed_lengths)
    packed: bool = False
    # float32 with torch's default TF32 flags on both sides: cuDNN's RNNs
    # (torch.nn) and fused_rnn's float32 RNNs may use TF32, cuBLAS's
    # products stay exact; else (the default) TF32 is off everywhere
    tf32: bool = False
    proj_size: int = 0  # LSTM with a projection of this size (0: none)

    def __post_init__(self):
        if self.input_size is None:
            self.input_size = self.hidden_size


def packed_lengths(config: Config) -> list[int]:
    """The lengths of a packed batch, sorted: evenly from seq_len down to
    half of it (every step still has rows, the batch shrinks along time)."""
    T, B = config.seq_len, config.batch
    shortest = max(1, (T + 1) // 2)
    return [T - (i * (T - shortest)) // max(1, B - 1) for i in range(B)]


def make_pair(config: Config, seed: int = 0):
    """(torch.nn module, fused twin) with the same weights."""
    torch_type, fused_type, extra = CELLS[config.cell]
    if config.proj_size:
        extra = {**extra, "proj_size": config.proj_size}
    kwargs = dict(
        input_size=config.input_size, hidden_size=config.hidden_size,
        num_layers=config.num_layers, bidirectional=config.bidirectional, **extra,
    )
    dtype = getattr(torch, config.dtype)
    torch.manual_seed(seed)
    reference = torch_type(**kwargs).to(config.device, dtype)
    fused = fused_type(**kwargs).to(config.device, dtype)
    fused.load_state_dict(reference.state_dict())
    if config.device.startswith("cuda"):
        reference.flatten_parameters()
    return reference, fused


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def make_inputs(config: Config, seed: int = 0):
    """Random input (T, B, I) and upstream gradient (T, B, D*H) for config;
    packed: a PackedSequence of packed_lengths and the gradient of its
    output's data (N, D*H)."""
    dtype = getattr(torch, config.dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(
        config.seq_len, config.batch, config.input_size, generator=generator
    ).to(config.device, dtype)
    directions = 2 if config.bidirectional else 1
    grad = torch.randn(
        config.seq_len, config.batch, directions * (config.proj_size or config.hidden_size),
        generator=generator,
    ).to(config.device, dtype)
    if config.packed:
        lengths = packed_lengths(config)
        x = nn.utils.rnn.pack_padded_sequence(x, lengths)
        grad = nn.utils.rnn.pack_padded_sequence(grad, lengths).data
    return _leaf(x, config.training), grad


def _leaf(x, requires_grad):
    """A fresh leaf copy of an input tensor or of a PackedSequence's data."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return x._replace(data=x.data.detach().clone().requires_grad_(requires_grad))
    return x.detach().clone().requires_grad_(requires_grad)


def _input_grad(x):
    return x.data.grad if isinstance(x, nn.utils.rnn.PackedSequence) else x.grad


def _timed(fn, device):
    """Seconds one call of fn takes: CUDA events on a GPU, else a wall clock."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def step(module, x, grad, training):
    """One forward (no_grad), or forward + backward of output * grad."""
    if not training:
        with torch.no_grad():
            return _data(module(x)[0])
    module.zero_grad(set_to_none=True)
    output = _data(module(x)[0])
    output.backward(grad)
    return output


def _data(output):
    return output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output


def run(config: Config, repeats: int = 10, warmup: int = 2, seed: int = 0) -> dict:
    """Times torch.nn and fused on `config`; returns a row with both times
    (ms, medians), the speed-up, per-step latency and the parity error of
    the output (and input gradient when training) against torch.nn."""
    reference, fused = make_pair(config, seed)
    x, grad = make_inputs(config, seed)

    with tf32_flags(config):
        error = _parity(reference, fused, x, grad, config.training)
        times = {"torch": [], "fused": []}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(warmup + repeats):
                if i == warmup:
                    replays = paths.cuda_graph_cache_info()["replays"]
                for name, module in (("torch", reference), ("fused", fused)):
                    elapsed = _timed(lambda: step(module, x, grad, config.training),
                                     config.device)
                    if i >= warmup:
                        times[name].append(elapsed)
        # torch.nn's cuDNN path compacts its weights on every call when
        # flatten_parameters() could not make them one buffer (cuDNN takes
        # no bfloat16 there in some torch releases): say so in the row.
        flat = not any("contiguous chunk of memory" in str(w.message) for w in caught)
        for w in caught:
            if "contiguous chunk of memory" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        # what ran, under the flags it ran with
        # whether the general path's loops replayed CUDA graphs while timed
        replays = paths.cuda_graph_cache_info()["replays"] - replays
        names = {"kernel": kernel_name(config), "grid_sync": grid_sync_name(config),
                 "directions": directions_name(config), "math": math_name(config)}
    torch_ms = statistics.median(times["torch"]) * 1e3
    fused_ms = statistics.median(times["fused"]) * 1e3
    return {
        **dataclasses.asdict(config),
        **names,
        "torch_ms": torch_ms,
        "fused_ms": fused_ms,
        "speedup": torch_ms / fused_ms,
        "fused_us_per_step": fused_ms * 1e3 / config.seq_len,
        "torch_us_per_step": torch_ms * 1e3 / config.seq_len,
        "max_abs_error": error,
        "repeats": repeats,
        "torch_weights_flat": flat,
        "graph_replays": replays,
    }


def failed_row(config: Config, error: BaseException) -> dict:
    """The row of a configuration whose run raised: NaN times (which
    bench/goals.py counts as a miss) and the error."""
    nan = float("nan")
    try:
        kernel = kernel_name(config)
    except Exception:
        kernel = "?"
    return {
        **dataclasses.asdict(config),
        "kernel": kernel,
        "torch_ms": nan, "fused_ms": nan, "speedup": nan,
        "fused_us_per_step": nan, "torch_us_per_step": nan, "max_abs_error": nan,
        "repeats": 0,
        "error": f"{type(error).__name__}: {error}".splitlines()[0][:500],
    }


@contextlib.contextmanager
def tf32_flags(config: Config):
    """torch's TF32 flags for a configuration: off on both sides, or (tf32)
    torch's defaults (cuDNN's RNNs may use TF32, cuBLAS's products not);
    restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = config.tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def math_name(config: Config):
    """"tf32" where fused_rnn's forward (or, training, its backward)
    multiplies in TF32 for config, under the current flags; else None."""
    passes = (False, True) if config.training else (False,)
    return "tf32" if any("TF32" in _explain(config, b).split("; exact float32")[0]
                         for b in passes) else None


def _explain(config: Config, backward: bool = False) -> str:
    return paths.explain_kernel_path(config.cell, config.hidden_size, config.batch,
                                     getattr(torch, config.dtype), config.device,
                                     packed=config.packed, proj=config.proj_size > 0,
                                     backward=backward, bidirectional=config.bidirectional)


def kernel_name(config: Config) -> str:
    """The kernels fused_rnn runs for config's forward: persistent, stepwise,
    general (CUDA) or cpu."""
    return _explain(config).split()[0].lower()


def grid_sync_name(config: Config):
    """How the persistent kernels' blocks meet between steps for config:
    "cluster" (the cluster exchange), "tags" (the tagged exchange) or
    "barrier", forward/backward when training and they differ; None off
    the persistent kernels."""
    def sync(backward):
        text = _explain(config, backward)
        if not text.startswith("persistent kernel"):
            return None
        if "one cluster barrier per step" in text:
            return "cluster"
        return "tags" if "no grid barrier" in text else "barrier"

    forward = sync(False)
    backward = sync(True) if config.training else forward
    if forward is None and backward is None:
        return None
    return forward if forward == backward else f"{forward}/{backward}"


def directions_name(config: Config):
    """How a bidirectional layer's two directions run for config: "paired"
    (one launch for both) or "separate" (one after the other),
    forward/backward when training and they differ; None when
    unidirectional."""
    if not config.bidirectional:
        return None

    def pairing(backward):
        return "paired" if "both directions" in _explain(config, backward) else "separate"

    forward = pairing(False)
    backward = pairing(True) if config.training else forward
    return forward if forward == backward else f"{forward}/{backward}"


def _parity(reference, fused, x, grad, training):
    """Largest |fused - torch.nn| over the output, and over the input
    gradient when training."""
    outputs = []
    for module in (reference, fused):
        xi = _leaf(x, training)
        output = step(module, xi, grad, training)
        outputs.append((output.detach(), _input_grad(xi)))
    (out_t, grad_t), (out_f, grad_f) = outputs
    error = (out_t.float() - out_f.float()).abs().max().item()
    if training:
        error = max(error, (grad_t.float() - grad_f.float()).abs().max().item())
    return error


def environment(device: str) -> dict:
    """What the numbers were measured on."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        # how the persistent kernels' blocks meet between steps (paths.py)
        info["grid_sync"] = os.environ.get("FUSED_RNN_GRID_SYNC") or "auto"
        info["bidirectional"] = os.environ.get("FUSED_RNN_BIDIRECTIONAL") or "auto"
        info["cuda_graphs"] = paths.get_cuda_graphs()
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cell_label(row: dict) -> str:
    """The cell column: LSTMp256 for proj_size 256, a * for packed input."""
    proj = f"p{row['proj_size']}" if row.get("proj_size") else ""
    return row["cell"] + proj + ("*" if row.get("packed") else "")


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'cell':<10}{'mode':<9}{'dtype':<9}{'B':>5}{'H':>6}{'T':>5}"
        f"{'torch ms':>11}{'fused ms':>11}{'speedup':>9}{'max |diff|':>12}  kernel"
    )
    lines = [header, "-" * len(header)]
    if any(r.get("packed") for r in rows):
        lines.insert(0, "* packed: variable lengths as a PackedSequence, T the longest")
    if any(r.get("proj_size") for r in rows):
        lines.insert(0, "LSTMpP: LSTM with proj_size P")
    for r in rows:
        lines.append(
            f"{_cell_label(r):<10}"
            f"{'train' if r['training'] else 'forward':<9}{r['dtype']:<9}"
            f"{r['batch']:>5}{r['hidden_size']:>6}{r['seq_len']:>5}"
            f"{r['torch_ms']:>11.3f}{r['fused_ms']:>11.3f}{r['speedup']:>8.2f}x"
            f"{r['max_abs_error']:>12.2e}  {r.get('kernel', '')}"
            # a bidirectional layer's directions: one launch or one after the other
            + (f", {r['directions']}" if r.get("directions") else "")
            # float32 multiplied in TF32 (torch's default flags, both sides)
            + (", tf32" if r.get("math") == "tf32" else "")
            # the general path's per-step loops replayed from CUDA graphs
            + (", graph" if r.get("graph_replays") else "")
        )
    return "\n".join(lines)
