"""The persistent CUDA kernels (one cooperative launch per layer and
direction, weights on chip) and the same kernels one launch per step
(stepwise, weight slices in global memory), forced with
fused_rnn.kernel_path: the choice of path, float64 parity with the plain
PyTorch reference at odd sizes across every batch tile and block split,
float32 and half types within twice the general path's error, hidden sizes
past on-chip memory (stepwise), long sequences, a GPU busy with other work,
float32 in TF32 where torch allows it for cuDNN's RNNs (every other test
runs with TF32 off: exact float32). The module-level parity, gradcheck,
opcheck and CUDA-graph tests of test_cuda.py run on every path too. Every
test is skipped without a GPU."""

import os
import subprocess
import sys

import pytest
import torch

import fused_rnn
from helpers import (PAIR_PER_DIRECTION, assert_results_close, call_pair, call_reference,
                     call_wrapper, gradcheck_op, make_op_args, upstream_like)
from helpers import tf32_flags as tf32

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

DEVICE = "cuda"
# bfloat16 and TF32 tensor cores (compute capability 8.0); before it, float16
# alone multiplies on tensor cores, bfloat16 and float32 on FMA units.
AMPERE = torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 0)
CELLS = {"lstm": ("lstm", "LSTM", {}), "gru": ("gru", "GRU", {}),
         "rnn_tanh": ("rnn", "RNN_TANH", {"relu": False}),
         "rnn_relu": ("rnn", "RNN_RELU", {"relu": True})}
# (H, B, T): hidden sizes below, at and above one unit per SM; batches of
# one tile, several tiles and a ragged last tile.
SHAPES = [(1, 1, 1), (7, 3, 5), (33, 1, 4), (97, 9, 3), (130, 8, 2), (257, 17, 3),
          (600, 2, 2)]


@pytest.fixture(autouse=True)
def _persistent():
    """The persistent path forced, in exact float32 (torch's default allows
    TF32 for cuDNN's RNNs; the TF32 tests below turn it on)."""
    with fused_rnn.kernel_path("persistent"), tf32(cudnn=False):
        yield


@pytest.fixture(params=["persistent", "stepwise"])
def mode(request):
    """The persistent kernels as one cooperative launch, or one launch per
    step (stepwise)."""
    with fused_rnn.kernel_path(request.param):
        yield request.param


def explain(name, H, B, dtype, backward=False, **kw):
    return fused_rnn.explain_kernel_path(name, H, B, dtype, DEVICE, backward=backward, **kw)


def clusters():
    """Whether this GPU launches thread-block clusters (compute capability
    9.0 on): where the automatic choice takes the cluster exchange."""
    return torch.cuda.get_device_capability(DEVICE) >= (9, 0)


def require_persistent(name, H, B, dtype, mode="persistent"):
    """Skip, saying why, where this GPU's shared memory cannot hold the
    weights (the general path is tested there by test_cuda.py); the stepwise
    launches take every size."""
    if mode == "stepwise":
        for backward in (False, True):
            with fused_rnn.kernel_path("stepwise"):
                assert explain(name, H, B, dtype, backward=backward).startswith("stepwise kernels")
        return
    for backward in (False, True):
        text = explain(name, H, B, dtype, backward=backward)
        if not text.startswith("persistent kernel"):
            pytest.skip(f"{name} H={H} {dtype} does not fit this GPU: {text}")


def results(cell, args, seed=3):
    """Outputs and the gradients of every tensor argument, as a dict."""
    fn = call_wrapper if args.pop("_fused", True) else call_reference
    outs = [o for o in fn(cell, args) if o is not None]
    leaves = [(k, v) for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad(outs, [v for _, v in leaves], upstream_like(outs, seed))
    res = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    res.update({"grad_" + k: g for (k, _), g in zip(leaves, grads)})
    return res


def run(cell, fused, **kw):
    args = make_op_args(cell, device=DEVICE, requires_grad=True, **kw)
    args["_fused"] = fused
    return results(cell, args)


# ---------------------------------------------------------------- the choice

@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_choice(name):
    f32 = torch.float32
    assert explain(name, 256, 8, f32).startswith("persistent kernel")
    assert explain(name, 256, 8, f32, backward=True).startswith("persistent kernel")
    if os.environ.get("FUSED_RNN_GRID_SYNC", "auto") == "auto":
        # small batches: on Hopper one thread-block cluster whose blocks put
        # each step's rows into each other's shared memory; elsewhere the
        # blocks pass them on tagged, without a grid barrier; where the
        # tagged words would add more than 4 MiB of L2 reads per step, a
        # grid barrier
        small = "one cluster barrier per step" if clusters() else "no grid barrier"
        assert small in explain(name, 256, 8, f32)
        assert small in explain(name, 256, 8, f32, backward=True)
        wide = explain(name, 1024, 64, f32)
        if wide.startswith("persistent kernel"):
            assert "one grid barrier per step" in wide
    # packed sequences: each step's rows from a table on the device
    assert explain(name, 256, 8, f32, packed=True).startswith("persistent kernel")
    assert "packed sequences" in explain(name, 256, 8, f32, packed=True)
    with fused_rnn.kernel_path("general"):
        assert explain(name, 256, 8, f32).startswith("general path")
    with fused_rnn.kernel_path("auto"):
        assert explain(name, 256, 8, f32).startswith("persistent kernel")
        assert explain(name, 256, 64, torch.bfloat16).startswith("persistent kernel")
        # FMA work per block and step past the automatic limit: cuBLAS per step
        assert explain(name, 1024, 2048, f32).startswith("general path")
    if name == "LSTM" and torch.cuda.get_device_properties(0).multi_processor_count >= 128:
        # the rule fitted to the H200 grid (132 SMs): up to 16 sequences always
        # persistent; past that, rows x k x batch per block of at most 2^18
        # (2^19 for the tensor-core forward)
        with fused_rnn.kernel_path("auto"):
            assert explain(name, 1024, 16, f32).startswith("persistent kernel")
            assert explain(name, 256, 64, f32).startswith("persistent kernel")
            assert explain(name, 256, 64, f32, backward=True).startswith("persistent kernel")
            assert explain(name, 512, 64, f32).startswith("general path")
            assert explain(name, 512, 64, f32, backward=True).startswith("general path")
            assert explain(name, 512, 64, torch.bfloat16).startswith("persistent kernel")
            assert explain(name, 1024, 64, torch.bfloat16).startswith("general path")
        # the whole previous state (backward: the next step's gradients)
        # staged at once where the block's shared memory holds it beside the
        # weights: on 132 SMs an fp32 LSTM backward at H=1024 holds
        # 8 x 4096 weights (128 KiB) and 4096 staged columns (16 KiB)
        assert "staged 256 of 256 columns" in explain(name, 256, 8, f32)
        assert "staged 4096 of 4096 columns" in explain(name, 1024, 1, f32, backward=True)
    if explain(name, 1024, 2048, f32).startswith("persistent kernel"):  # fits this GPU
        assert "FMA" in explain(name, 1024, 2048, f32)
    assert "tensor cores" in explain(name, 256, 64, torch.float16)
    if AMPERE:
        assert "tensor cores" in explain(name, 256, 64, torch.bfloat16)
    else:
        text = explain(name, 256, 64, torch.bfloat16)
        assert "FMA units (wmma multiplies BFloat16 from compute capability 8.0" in text, text
    assert "FMA" in explain(name, 256, 1, torch.bfloat16)
    assert explain(name, 256, 256, f32).startswith("persistent kernel")
    # far too large for shared memory on any GPU
    assert explain(name, 8192, 8, torch.float64).startswith("general path")
    # proj_size folded into the recurrent weight (weight_hh @ weight_hr)
    text = explain("LSTM", 256, 8, f32, proj=True)
    assert text.startswith("proj_size folded") and "): persistent kernel" in text, text
    with fused_rnn.kernel_path("stepwise"):
        # any hidden size, in waves of blocks past the SM count
        for H, B, dtype in ((256, 8, f32), (8192, 8, torch.float64), (3000, 300, torch.float16)):
            for backward in (False, True):
                text = explain(name, H, B, dtype, backward=backward)
                assert text.startswith("stepwise kernels"), text
        # packed sequences too (the rows of each step come with its launch)
        assert explain(name, 256, 8, f32, packed=True).startswith("stepwise kernels")
        text = explain("LSTM", 256, 8, f32, proj=True)
        assert text.startswith("proj_size folded") and "): stepwise kernels" in text, text
    with fused_rnn.kernel_path("auto"):
        # packed input as dense input of its largest batch
        assert explain(name, 256, 8, f32, packed=True).startswith("persistent kernel")
        assert explain(name, 256, 8, f32, packed=True, backward=True).startswith(
            "persistent kernel")
        assert explain(name, 1024, 2048, f32, packed=True).startswith("general path")


# ---------------------------------------------------------------- float64

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}_B{}_T{}".format(*s))
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_float64_matches_reference(mode, cell_key, shape, reverse):
    cell, name, extra = CELLS[cell_key]
    H, B, T = shape
    require_persistent(name, H, B, torch.float64, mode)
    kw = dict(T=T, B=B, I=5, H=H, reverse=reverse, **extra)
    assert_results_close(run(cell, True, **kw), run(cell, False, **kw),
                         what=f"{mode} {name} H={H} B={B} T={T} reverse={reverse}")


@pytest.mark.parametrize("cell_key", list(CELLS))
@pytest.mark.parametrize("shape", [(3000, 3, 3), (2200, 20, 2)],
                         ids=lambda s: "H{}_B{}_T{}".format(*s))
def test_stepwise_past_on_chip_memory(cell_key, shape):
    """Hidden sizes whose weights no GPU holds on chip in float64: more
    blocks than SMs (waves, in the LSTM and GRU forward on a GPU of up to
    ~140 SMs), a ragged last block, both batch tiles."""
    cell, name, extra = CELLS[cell_key]
    H, B, T = shape
    with fused_rnn.kernel_path("stepwise"):
        require_persistent(name, H, B, torch.float64, "stepwise")
        kw = dict(T=T, B=B, I=5, H=H, **extra)
        assert_results_close(run(cell, True, **kw), run(cell, False, **kw),
                             what=f"stepwise {name} H={H} B={B} T={T}")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [(5, 3, 3, 1), (4,) * 9 + (2,) * 9 + (1,) * 3],
                         ids=["ragged", "tiles"])
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_packed(mode, cell_key, lengths, reverse):
    """Packed sequences in one cooperative launch (each step's rows from the
    step table on the device) and on the stepwise launches: sequences ending
    early (and, in reverse, starting late), one and several batch tiles,
    against the reference in float64."""
    cell, name, extra = CELLS[cell_key]
    for backward in (False, True):
        text = explain(name, 300, len(lengths), torch.float64, packed=True, backward=backward)
        assert text.startswith("stepwise kernels" if mode == "stepwise" else "persistent kernel")
    kw = dict(B=len(lengths), I=5, H=300, lengths=lengths, reverse=reverse, **extra)
    assert_results_close(run(cell, True, **kw), run(cell, False, **kw),
                         what=f"{mode} packed {name} lengths={lengths} reverse={reverse}")


def test_packed_no_host_sync():
    """Packed input in one cooperative launch: its step table goes to the
    device from pinned memory without a host synchronisation (torch's sync
    debug mode raises on one), forward and backward."""
    require_persistent("LSTM", 64, 4, torch.float32)
    assert explain("LSTM", 64, 4, torch.float32, packed=True).startswith("persistent kernel")
    lstm = fused_rnn.LSTM(5, 64, device=DEVICE)
    x = torch.randn(6, 4, 5, device=DEVICE, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [6, 4, 4, 1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, (h, c) = lstm(packed)
        (out.data.sum() + h.sum() + c.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all() and x.grad[:, 0].abs().sum() > 0


@pytest.mark.parametrize("cell_key", ["lstm", "gru"])
def test_packed_capture_runs_stepwise(cell_key):
    """While a CUDA graph is being captured, packed input cannot copy its
    step table to the device with the launch (the replays could not count
    on the host buffer): the persistent path runs those launches stepwise,
    and the replay on new data matches eager calls."""
    _, name, _ = CELLS[cell_key]
    module = getattr(fused_rnn, name)(5, 40, num_layers=2, bidirectional=True,
                                      device=DEVICE, dtype=torch.float64)
    lengths = [6, 4, 4, 1]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    xs = [torch.randn(6, 4, 5, device=DEVICE, dtype=torch.float64, generator=gen)
          for _ in range(3)]
    packed = torch.nn.utils.rnn.pack_padded_sequence(xs[0], lengths)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        module(packed)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out, static_state = module(packed)
    for x in xs[1:]:
        new = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
        packed.data.copy_(new.data)
        graph.replay()
        with torch.no_grad():
            out, state = module(new)
        assert_results_close({"out": static_out.data, "h": static_state[0]},
                             {"out": out.data, "h": state[0]}, what=f"{name} packed graph")


@pytest.mark.parametrize("cell_key", list(CELLS))
def test_float64_no_bias(mode, cell_key):
    cell, name, extra = CELLS[cell_key]
    kw = dict(T=3, B=10, I=4, H=45, bias=False, **extra)
    assert_results_close(run(cell, True, **kw), run(cell, False, **kw))


@pytest.mark.parametrize("cell_key", list(CELLS))
def test_gradcheck(mode, cell_key):
    cell, name, extra = CELLS[cell_key]
    require_persistent(name, 3, 2, torch.float64, mode)
    args = make_op_args(cell, T=3, B=2, I=3, H=3, requires_grad=True, device=DEVICE, **extra)
    assert gradcheck_op(cell, args)


# ---------------------------------------------------------------- float32 and half

def max_errors(res, ref):
    return {k: (res[k].double() - ref[k]).abs().max().item() / (ref[k].abs().max().item() or 1)
            for k in ref}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1024, 1, 3), (512, 8, 4), (1024, 70, 2), (256, 64, 5),
                                   (256, 1, 4), (256, 3, 4)],
                         ids=lambda s: "H{}_B{}_T{}".format(*s))
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_low_precision_within_twice_general_error(mode, cell_key, shape, dtype):
    """Against float64: the persistent kernel's error (one launch or
    stepwise) is at most twice the general path's (cuBLAS per step) plus a
    little. On Hopper the cluster exchange takes H=256 at B=1 and 3 (both
    FMA tiles), the half types' H=512 at B=8 and their H=256 at B=64."""
    cell, name, extra = CELLS[cell_key]
    H, B, T = shape
    require_persistent(name, H, B, dtype, mode)
    assert_within_twice_general(cell, dict(T=T, B=B, I=16, H=H, **extra), dtype, mode)


def assert_within_twice_general(cell, kw, dtype, path):
    """Against float64, every output and gradient of `path`'s run in dtype
    is within twice the general path's error plus a little."""
    ref = run(cell, False, **kw)  # float64 reference
    low = {}
    for p in (path, "general"):
        with fused_rnn.kernel_path(p):
            args = make_op_args(cell, dtype=dtype, device=DEVICE, requires_grad=True, **kw)
            low[p] = max_errors(results(cell, args), ref)
    eps = torch.finfo(dtype).eps
    for k, err in low[path].items():
        assert err <= 2 * low["general"][k] + 4 * eps, (k, err, low["general"][k])


def test_tf32_choice():
    """float32 takes the tensor-core tile in TF32 where torch allows TF32 for
    its RNNs (cuDNN's flag; cuBLAS's with cuDNN disabled) and the batch is
    wider than the FMA tile; exact FMA where it does not, at up to 8
    sequences, and where the TF32 tiles (rows padded to 16) would not fit
    but the FMA tile does."""
    f32 = torch.float32
    if not AMPERE:  # no TF32 on this GPU: exact FMA whatever the flags
        with tf32(cudnn=True, matmul=True):
            for backward in (False, True):
                text = explain("LSTM", 256, 64, f32, backward=backward)
                assert "FMA" in text and "TF32" not in text, text
        return
    for name in ("LSTM", "GRU", "RNN_TANH"):
        for backward in (False, True):
            with tf32(cudnn=True):
                assert "tensor cores in TF32" in explain(name, 256, 64, f32, backward=backward)
                assert "FMA" in explain(name, 256, 8, f32, backward=backward)
                assert "FMA" in explain(name, 256, 1, f32, backward=backward)
                with fused_rnn.kernel_path("stepwise"):
                    text = explain(name, 256, 64, f32, backward=backward)
                    assert text.startswith("stepwise") and "TF32" in text, text
            assert "FMA" in explain(name, 256, 64, f32, backward=backward)
            assert "TF32" not in explain(name, 256, 64, f32, backward=backward)
    with tf32(cudnn=False, matmul=True):  # cuBLAS's flag is not cuDNN's RNNs'
        assert "TF32" not in explain("LSTM", 256, 64, f32)
    # with cuDNN disabled torch.nn's RNNs multiply through cuBLAS: its flag
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        for matmul in (False, True):
            with tf32(cudnn=not matmul, matmul=matmul):
                assert ("TF32" in explain("LSTM", 256, 64, f32)) == matmul
    finally:
        torch.backends.cudnn.enabled = enabled
    props = torch.cuda.get_device_properties(0)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if 100 <= props.multi_processor_count <= 132 and 160 * 1024 <= optin < 256 * 1024:
        # the LSTM backward at H=1024 (A100, H100, H200): 8 rows of 4096
        # W_hh^T columns per block, 128 KiB in float32; padded to 16 rows for
        # the tensor cores, 256 KiB: exact FMA
        with tf32(cudnn=True):
            text = explain("LSTM", 1024, 64, f32, backward=True)
        assert text.startswith("persistent kernel") and "FMA" in text, text
        assert "TF32 is allowed, but" in text, text


@pytest.mark.parametrize("shape", [(256, 64, 5), (97, 40, 3)],
                         ids=lambda s: "H{}_B{}_T{}".format(*s))
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_tf32_when_torch_allows_it(mode, cell_key, shape):
    """With TF32 allowed, float32 outputs and every gradient are within twice
    the error of torch's own TF32 products (cuDNN's RNN and the general
    path's cuBLAS GEMMs with TF32 allowed, the larger) against float64, and
    they differ from the exact float32 kernels (TF32 ran)."""
    if not AMPERE:
        pytest.skip("this GPU has no TF32 (compute capability 8.0): float32 stays exact, "
                    "as test_tf32_choice checks")
    cell, name, extra = CELLS[cell_key]
    H, B, T = shape
    kw = dict(T=T, B=B, I=16, H=H, **extra)
    with tf32(cudnn=True):
        for backward in (False, True):
            assert "TF32" in explain(name, H, B, torch.float32, backward=backward)
    ref = run(cell, False, **kw)  # float64

    def errors(fused, cudnn, matmul=False, path=None):
        with tf32(cudnn, matmul), fused_rnn.kernel_path(path or mode):
            args = make_op_args(cell, dtype=torch.float32, device=DEVICE, requires_grad=True,
                                **kw)
            args["_fused"] = fused
            res = results(cell, args)
        return res, max_errors(res, ref)

    ours, err = errors(True, cudnn=True)
    exact, _ = errors(True, cudnn=False)
    _, err_torch = errors(False, cudnn=True, matmul=True)
    _, err_general = errors(True, cudnn=True, matmul=True, path="general")
    eps = torch.finfo(torch.float32).eps
    for k, e in err.items():
        bound = 2 * max(err_torch[k], err_general[k]) + 4 * eps
        assert e <= bound, (k, e, err_torch[k], err_general[k])
    assert max_errors(ours, exact)["out0"] > 1e-5, "the TF32 kernels did not run"


@pytest.mark.parametrize("cell_key", ["lstm", "gru"])
def test_auto_forward_persistent_backward_general(cell_key):
    """The automatic choice decides forward and backward apart: at a shape
    where it runs the persistent forward and the general backward, the
    gradients (from what the persistent forward saved) are as close to
    float64 as the general path's own."""
    cell, name, extra = CELLS[cell_key]
    dtype, H, B, T = torch.bfloat16, 512, 64, 3
    with fused_rnn.kernel_path("auto"):
        forward = explain(name, H, B, dtype)
        backward = explain(name, H, B, dtype, backward=True)
    if not (forward.startswith("persistent kernel") and backward.startswith("general path")):
        pytest.skip(f"the automatic choice on this GPU is not mixed here: {forward} / {backward}")
    assert_within_twice_general(cell, dict(T=T, B=B, I=16, H=H, **extra), dtype, "auto")


def test_long_sequence_many_barriers(mode):
    """T=3000: thousands of steps in one launch (the tagged ring's two slots
    reused 1500 times each; or grid barriers), or of launches (stepwise),
    both directions."""
    for reverse in (False, True):
        kw = dict(T=3000, B=3, I=8, H=64, reverse=reverse, dtype=torch.float32)
        with fused_rnn.kernel_path("general"):
            expected = results("lstm", make_op_args("lstm", device=DEVICE, requires_grad=True,
                                                    **kw))
        actual = results("lstm", make_op_args("lstm", device=DEVICE, requires_grad=True, **kw))
        assert_results_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_grid_barrier_mode_in_a_fresh_process():
    """FUSED_RNN_GRID_SYNC (read once per process) forces the persistent
    launches to a grid barrier per step, to the tagged exchange or (where it
    fits) to the cluster exchange: explain says so, and with the barrier and
    the tags `fused-rnn check` passes on the persistent path (every cell,
    dense and packed, forward and backward; the rest of the suite runs the
    cluster exchange wherever the automatic choice takes it); an unknown
    value is a clear error, not a silent default."""
    def python(code, value):
        env = dict(os.environ, FUSED_RNN_GRID_SYNC=value, FUSED_RNN_KERNEL_PATH="persistent")
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=600)

    explain_code = ("import torch, fused_rnn; print(fused_rnn.explain_kernel_path("
                    "'LSTM', {}, {}, torch.float32, 'cuda'))")
    check_code = explain_code + ("; from fused_rnn import cli; raise SystemExit(cli.main("
                                 "['check', '--device', 'cuda', '--kernel', 'persistent']))")
    # a small batch, which the automatic choice exchanges tagged
    proc = python(check_code.format(256, 8), "barrier")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "one grid barrier per step" in proc.stdout and "FAIL" not in proc.stdout
    assert "as FUSED_RNN_GRID_SYNC says" in proc.stdout
    # a large one, which it gives a barrier (the rest of the suite runs the
    # tags wherever the automatic choice takes them)
    proc = python(explain_code.format(256, 256), "tags")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no grid barrier" in proc.stdout
    if clusters():
        # the small batch, which the automatic choice gives a cluster on
        # Hopper: with the tags forced, checked on the grid of all SMs
        proc = python(check_code.format(256, 8), "tags")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "no grid barrier" in proc.stdout and "FAIL" not in proc.stdout
        # past the automatic work rule, a cluster where forced
        proc = python(explain_code.format(256, 64), "cluster")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "one cluster barrier per step" in proc.stdout, proc.stdout
    proc = python(explain_code.format(256, 8), "fences")
    assert proc.returncode != 0
    assert ("FUSED_RNN_GRID_SYNC must be 'auto', 'cluster', 'tags' or 'barrier', got 'fences'"
            in proc.stderr)


def test_gpu_busy_with_other_work():
    """A kernel already running on another stream: the cooperative launch
    waits for room or falls back (to the stepwise launches), never hangs,
    and the result is right."""
    require_persistent("GRU", 300, 4, torch.float64)
    kw = dict(T=20, B=4, I=8, H=300, dtype=torch.float64)
    expected = run("gru", False, **kw)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
    actual = run("gru", True, **kw)
    torch.cuda.synchronize()
    assert_results_close(actual, expected)


@pytest.mark.parametrize("path", ["persistent", "stepwise", "general"])
def test_two_layer_bidirectional_lstm(path):
    """The benchmark's multi-layer shape: both directions and both layers on
    the chosen path, against torch.nn (cuDNN) in float64."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(64, 96, num_layers=2, bidirectional=True, device=DEVICE,
                        dtype=torch.float64)
    fused = fused_rnn.LSTM(64, 96, num_layers=2, bidirectional=True, device=DEVICE,
                           dtype=torch.float64)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(12, 64, 64, device=DEVICE, dtype=torch.float64, requires_grad=True)
    with fused_rnn.kernel_path(path):
        out_f, (h_f, c_f) = fused(x)
        g_f = torch.autograd.grad((out_f.sum() + h_f.sum() + c_f.sum()), [x, *fused.parameters()])
    out_r, (h_r, c_r) = ref(x)
    g_r = torch.autograd.grad((out_r.sum() + h_r.sum() + c_r.sum()), [x, *ref.parameters()])
    torch.testing.assert_close(out_f, out_r, atol=1e-10, rtol=1e-10)
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# ------------------------------------------------- both directions, one launch

def require_pair(name, H, B, dtype, mode="persistent", packed=False):
    """Skip, saying why, where this GPU cannot hold both directions' weights
    side by side (each direction then runs on its own: the tests above)."""
    for backward in (False, True):
        text = explain(name, H, B, dtype, backward=backward, bidirectional=True, packed=packed)
        if "both directions" not in text:
            pytest.skip(f"{name} H={H} {dtype} {mode}: no paired launch here: {text}")
        assert text.startswith("persistent kernel" if mode == "persistent" else
                               "stepwise kernels"), text


def pair_results(cell, a, b, seed=3):
    """The pair op's outputs and the gradients of every tensor of both
    directions' arguments, as a dict (reference: each direction on its own,
    torch's kernels)."""
    fused = call_pair(cell, a, b)
    n = len(fused) // 2
    ref = [o for o in (*call_reference(cell, a), *call_reference(cell, b)) if o is not None]
    leaves = [v for d in (a, b) for v in d.values()
              if isinstance(v, torch.Tensor) and v.requires_grad]
    leaves = list({id(v): v for v in leaves}.values())
    out = {}
    for name, outs in (("fused", list(fused)), ("ref", ref)):
        grads = torch.autograd.grad(outs, leaves, upstream_like(outs, seed))
        out[name] = {f"out{i}": o.detach() for i, o in enumerate(outs)}
        out[name].update({f"grad{i}": g for i, g in enumerate(grads)})
    assert len(ref) == 2 * n
    return out["fused"], out["ref"]


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("shape", [(7, 3, 5), (97, 9, 3), (257, 17, 3)],
                         ids=lambda s: "H{}_B{}_T{}".format(*s))
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_both_directions_in_one_launch(mode, cell_key, shape, packed):
    """Both directions of a layer side by side in one launch (the _pair ops)
    against torch's kernels run per direction: outputs, states and the
    gradients of the input, the states and every parameter of both, float64."""
    cell, name, extra = CELLS[cell_key]
    H, B, T = shape
    require_pair(name, H, B, torch.float64, mode, packed)
    lengths = tuple(sorted(((i * 7) % T) + 1 for i in range(B))[::-1]) if packed else None
    a, b = (make_op_args(cell, T=T, B=B, I=6, H=H, device=DEVICE, requires_grad=True,
                         lengths=lengths, seed=seed, reverse=seed == 1, **extra)
            for seed in (0, 1))
    b["input"] = a["input"]
    actual, expected = pair_results(cell, a, b)
    assert_results_close(actual, expected)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN_TANH"])
def test_pair_choice(name):
    """Both directions share a launch where their weights fit side by side
    on half the SMs each; where only one direction fits, each runs on its
    own, persistent, one after the other."""
    f32 = torch.float32
    for backward in (False, True):
        text = explain(name, 256, 8, f32, backward=backward, bidirectional=True)
        assert text.startswith("persistent kernel") and "both directions" in text, text
    with fused_rnn.kernel_path("stepwise"):
        text = explain(name, 256, 8, f32, bidirectional=True)
        assert text.startswith("stepwise kernels") and "both directions" in text, text
    with fused_rnn.kernel_path("general"):
        assert explain(name, 256, 8, f32, bidirectional=True).startswith("general path")
    props = torch.cuda.get_device_properties(0)
    if name == "LSTM" and 100 <= props.multi_processor_count <= 132 and (
            getattr(props, "shared_memory_per_block_optin", 0) >= 160 * 1024):
        # float32 LSTM forward at H=1024 (A100, H100, H200): 8 units (128 KiB
        # of W_hh) per block on 132 SMs fit, 16 on 66 SMs (256 KiB) do not
        text = explain(name, 1024, 1, f32, bidirectional=True)
        assert text.startswith("persistent kernel") and "each direction on its own" in text


@pytest.mark.parametrize("cell_key", ["lstm", "gru"])
def test_pair_opcheck_and_gradcheck(cell_key):
    cell, name, extra = CELLS[cell_key]
    require_pair(name, 9, 3, torch.float64)
    a, b = (make_op_args(cell, T=3, B=3, I=4, H=9, device=DEVICE, requires_grad=True,
                         seed=seed, reverse=seed == 1, **extra) for seed in (0, 1))
    b["input"] = a["input"]
    keys = [k for k in a if isinstance(a[k], torch.Tensor) and a[k].requires_grad]
    op = getattr(torch.ops.fused_rnn, f"{cell}_forward_pair").default
    per_direction = [k for k in keys if k != "input"]
    torch.library.opcheck(op, (a["input"], *(a[k] for k in PAIR_PER_DIRECTION[cell]),
                               *(b[k] for k in PAIR_PER_DIRECTION[cell]), None, True))

    def fn(*tensors):
        x, rest = tensors[0], tensors[1:]
        a2 = dict(a, input=x, **dict(zip(per_direction, rest[:len(per_direction)])))
        b2 = dict(b, input=x, **dict(zip(per_direction, rest[len(per_direction):])))
        return call_pair(cell, a2, b2)

    assert torch.autograd.gradcheck(
        fn, [a["input"], *(a[k] for k in per_direction), *(b[k] for k in per_direction)],
        eps=1e-6, atol=1e-7, rtol=1e-5)


def test_separate_directions_in_a_fresh_process():
    """FUSED_RNN_BIDIRECTIONAL=separate (read once per process) runs each
    direction on its own: explain says so, and a bidirectional LSTM's
    outputs and gradients equal those of the paired launch (float64, same
    weights); an unknown value is a clear error."""
    code = (
        "import torch, fused_rnn\n"
        "print(fused_rnn.explain_kernel_path('LSTM', 64, 4, torch.float64, 'cuda', "
        "bidirectional=True))\n"
        "torch.manual_seed(0)\n"
        "m = fused_rnn.LSTM(8, 64, num_layers=2, bidirectional=True, device='cuda', "
        "dtype=torch.float64)\n"
        "x = torch.randn(6, 4, 8, device='cuda', dtype=torch.float64, requires_grad=True)\n"
        "out, (h, c) = m(x)\n"
        "g = torch.autograd.grad(out.sum() + h.sum() + c.sum(), [x, *m.parameters()])\n"
        "print(repr([out.sum().item(), h.sum().item(), *[t.sum().item() for t in g]]))\n"
    )

    def python(value):
        env = dict(os.environ, FUSED_RNN_BIDIRECTIONAL=value, FUSED_RNN_KERNEL_PATH="persistent")
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=600)

    paired, separate = python("auto"), python("separate")
    for proc in (paired, separate):
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "both directions" in paired.stdout.splitlines()[0]
    assert "FUSED_RNN_BIDIRECTIONAL=separate" in separate.stdout.splitlines()[0]
    got = eval(separate.stdout.splitlines()[1])
    expected = eval(paired.stdout.splitlines()[1])
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    proc = python("together")
    assert proc.returncode != 0
    assert "FUSED_RNN_BIDIRECTIONAL must be 'auto' or 'separate', got 'together'" in proc.stderr
