"""Which CUDA kernels fused_rnn runs, and why.

On CUDA every op runs one of three paths:

- ``persistent``: one cooperative launch for the whole sequence, the
  recurrent weights held on chip (shared memory) for every step. The blocks
  pass each step's rows to one another through a tagged ring in global
  memory (each value carries the step that wrote it, so a reader waits on
  the data itself, no grid barrier) where its wider words cost L2 less time
  than a barrier (small batches), else meet at a grid barrier per step. On
  Hopper, where all blocks of a direction fit in one thread-block cluster
  (at most 16) and the batch is small, the launch is that cluster: each
  block puts its rows into every peer's shared memory and a step ends at one
  cluster barrier. ``FUSED_RNN_GRID_SYNC`` (auto, cluster, tags or barrier;
  read once per process) overrides that, to compare them. Dense or packed
  input (each step's rows from a table copied to the device with the launch;
  packed input runs stepwise while a CUDA graph is being captured), weights
  that fit the device's shared memory; ``proj_size`` folded (the recurrence
  on o * tanh(c) with ``weight_hh @ weight_hr``, the projection one GEMM
  after it).
- ``stepwise``: the persistent kernels' code, one ordinary launch per step
  (the launch boundary is the barrier), each block's slice of the weights
  packed once per call into global memory and read from there (L2). Dense
  or packed input, ``proj_size`` folded, any hidden size; no co-residency
  needed, so it is also what a persistent call falls back to when the
  driver refuses its grid as not co-resident (an MPS client limited to
  fewer SMs, say).
- ``general``: per step one cuBLAS GEMM and one fused pointwise kernel. Any
  shape, packed sequences and ``proj_size`` included.

The default, ``auto``, takes the persistent kernels where they fit and are
expected to win (up to 16 sequences always, beyond while a block's work per
step stays small), the stepwise launches where the device takes no
cooperative launch, and the general path elsewhere; packed input as dense
input of its largest batch. ``persistent`` takes the persistent kernels
wherever they fit, ``stepwise`` the stepwise ones wherever they apply,
``general`` neither. The choice is process-wide; set it here, or with the
environment variable ``FUSED_RNN_KERNEL_PATH`` before the first call::

    fused_rnn.set_kernel_path("general")
    with fused_rnn.kernel_path("persistent"):
        out, state = lstm(x)
    print(fused_rnn.explain_kernel_path("LSTM", 512, batch=8, dtype=torch.bfloat16))

On the general path, a call's per-step loop is captured into a CUDA graph
and replayed by later calls: one host call for the whole sequence instead
of two or three ATen calls per step, which is what bounds that path at
small and medium batches. A call whose tensors lie where an earlier call's
did (the steady state of a loop over batches of one shape, with torch's
caching allocator) replays that call's graph on its own tensors; a shape
whose addresses keep changing gets, at its third call, a graph on tensors
of its own, into which each call copies its inputs and out of which it
copies its results. ``set_cuda_graphs`` / ``FUSED_RNN_CUDA_GRAPHS``:
``auto`` (the default: sequences of 8 steps or more whose per-step product
is at most 2^28 multiply-adds), ``always`` (a graph on tensors of its own
for every shape from its first call), ``off``; never inside a CUDA graph
capture of the caller's. The cache keeps up to 64 graphs, by default up to
1/64 of the device's memory of tensors of their own
(``set_cuda_graph_limits``, ``cuda_graph_cache_info``,
``clear_cuda_graphs``)::

    with fused_rnn.cuda_graphs("off"):
        out, state = lstm(x)

On the CPU there is one path (a C++ sequence loop), and the setting is
ignored. Its float32 matrix products run fused_rnn's own packed AVX-512 GEMM
where the CPU has AVX-512 (``auto``), else ATen's ``mm`` (the BLAS);
``set_cpu_gemm("aten")`` or ``FUSED_RNN_CPU_GEMM=aten`` forces ATen's::

    with fused_rnn.cpu_gemm("aten"):
        out, state = lstm(x)
    print(fused_rnn.explain_cpu_gemm())
"""

import contextlib

import torch

from . import ops  # noqa: F401  (loads the extension)

PATHS = ("auto", "persistent", "stepwise", "general")
CPU_GEMMS = ("auto", "aten")
CELLS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
# "emulate" and "emulate_auto" (the CPU loops through the same cache, as
# "always" and "auto" choose, the loop run in place of each replay) are for
# the tests; see csrc/include/fused_rnn/graphs.h.
GRAPH_MODES = ("auto", "always", "off", "emulate", "emulate_auto")


@contextlib.contextmanager
def _temporarily(get, set_, value):
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def set_kernel_path(path: str) -> None:
    """Choose the CUDA kernels for every later call: auto, persistent, stepwise
    or general."""
    if path not in PATHS:
        raise ValueError(f"kernel path must be one of {', '.join(PATHS)}, got {path!r}")
    torch.ops.fused_rnn.set_kernel_path(path)


def get_kernel_path() -> str:
    """The CUDA kernel choice now in force: auto, persistent, stepwise or general."""
    return torch.ops.fused_rnn.get_kernel_path()


def kernel_path(path: str):
    """Run the body of a ``with`` with another kernel choice, then restore
    the previous one."""
    return _temporarily(get_kernel_path, set_kernel_path, path)


def explain_kernel_path(cell: str, hidden_size: int, batch: int, dtype=torch.float32,
                        device="cuda", *, packed=False, proj=False, backward=False,
                        bidirectional=False) -> str:
    """Which kernels one layer of `cell` runs for this shape on `device`
    under the current choice, and why: a sentence starting with "persistent
    kernel", "stepwise kernels", "general path" or "CPU sequence kernel".
    One direction, or (bidirectional) both directions of the layer, which
    share each launch where the kernels' plan for the pair takes them. On
    CUDA in float32 it also says whether the products run in TF32, which
    follows torch.backends.cudnn.allow_tf32 at the time of the call (as
    torch.nn's cuDNN RNNs do)."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
    like = torch.empty(0, dtype=dtype, device=device)
    return torch.ops.fused_rnn.kernel_path(like, cell, int(hidden_size), int(batch), bool(packed),
                                           bool(proj), bool(backward), bool(bidirectional))


def set_cpu_gemm(choice: str) -> None:
    """Choose the CPU matrix products for every later call: auto (the packed
    AVX-512 kernel where the CPU has AVX-512) or aten (ATen's mm)."""
    if choice not in CPU_GEMMS:
        raise ValueError(f"CPU GEMM must be one of {', '.join(CPU_GEMMS)}, got {choice!r}")
    torch.ops.fused_rnn.set_cpu_gemm(choice)


def get_cpu_gemm() -> str:
    """The CPU GEMM choice now in force: auto or aten."""
    return torch.ops.fused_rnn.get_cpu_gemm()


def cpu_gemm(choice: str):
    """Run the body of a ``with`` with another CPU GEMM choice, then restore
    the previous one."""
    return _temporarily(get_cpu_gemm, set_cpu_gemm, choice)


def explain_cpu_gemm() -> str:
    """Which kernels the CPU matrix products run now, in words."""
    return torch.ops.fused_rnn.explain_cpu_gemm()


def set_cuda_graphs(mode: str) -> None:
    """Choose when the general path replays its per-step loop from a CUDA
    graph, for every later call: auto, always or off (emulate, emulate_auto:
    the CPU goes through the graph cache too, for tests)."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"CUDA graph mode must be one of {', '.join(GRAPH_MODES)}, got {mode!r}")
    torch.ops.fused_rnn.set_cuda_graphs(mode)


def get_cuda_graphs() -> str:
    """The CUDA graph mode now in force: auto, always, off or emulate."""
    return torch.ops.fused_rnn.get_cuda_graphs()


def cuda_graphs(mode: str):
    """Run the body of a ``with`` with another CUDA graph mode, then restore
    the previous one."""
    return _temporarily(get_cuda_graphs, set_cuda_graphs, mode)


def cuda_graph_cache_info() -> dict:
    """What the general path's graph cache has done since the process started
    (or the last clear): captures, replays, uncached (calls that could have
    taken a graph and ran without one: a shape's first calls under auto, one
    too large, one captured too often), evictions, and what it holds now
    (entries, bytes of the tensors of their own)."""
    keys = ("captures", "replays", "uncached", "evictions", "entries", "bytes")
    return dict(zip(keys, torch.ops.fused_rnn.cuda_graph_cache_info()))


def set_cuda_graph_limits(entry_bytes: int = 0, total_bytes: int = 0) -> None:
    """Cap the memory of the graph cache: the bytes of tensors one captured
    loop may hold (larger ones run without a graph) and the cache's in all
    (the least recently used entries go first). 0 restores a default: 1/256
    and 1/64 of the device's memory, at least 64 and 256 MiB."""
    torch.ops.fused_rnn.set_cuda_graph_limits(int(entry_bytes), int(total_bytes))


def cuda_graph_limits(device="cuda") -> dict:
    """The graph cache's limits in force for `device`: entry_bytes and
    total_bytes."""
    like = torch.empty(0, device=device)
    return dict(zip(("entry_bytes", "total_bytes"),
                    torch.ops.fused_rnn.cuda_graph_limits(like)))


def clear_cuda_graphs() -> None:
    """Drop every captured graph and its tensors (the memory returns to
    torch's caching allocator) and the cache's counts."""
    torch.ops.fused_rnn.clear_cuda_graphs()
