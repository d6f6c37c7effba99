"""The choice between the CUDA kernel paths and the plan of a persistent or
stepwise launch (csrc/cuda/persistent_plan.h), for GPUs described by their
limits, on the CPU: the same code that persistent.cu runs with the current
device's limits, compiled into the emulation extension. test_cuda_persistent.py
checks the choice on the GPU at hand; this checks it for every GPU below.
(The emulation stages 32 columns per chunk, a GPU 1024: the chunk widths
differ, the choices do not.)"""

import pytest
import torch

# (SMs, dynamic shared memory a block may have, cooperative launches,
# compute capability major * 10 + minor)
GPUS = {
    "H200": (132, 227 * 1024, True, 90),
    "H100": (132, 227 * 1024, True, 90),
    "A100": (108, 163 * 1024, True, 80),
    "L4": (58, 99 * 1024, True, 89),
    "T4": (40, 64 * 1024, True, 75),
}
CELL = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def choose(emu, gpu, name, hidden, batch, dtype, *, packed=False, proj=False, backward=False,
           directions=1, tf32=False, want="auto", sync="auto", cooperative=None, cluster=-1,
           code_arch=0):
    """(path, reason, batch tile, units per block, blocks per direction,
    exchange: "cluster", "tags" or "barrier" on the persistent kernel, else
    ""); cluster: the largest thread-block cluster (-1: as the launcher
    reads it, 16 from compute capability 9.0, 0 before); code_arch: the PTX
    version of the build's code as the GPU loads it (0: the GPU's own)."""
    sms, shared, coop, arch = GPUS[gpu]
    coop = coop if cooperative is None else cooperative
    return emu.choose(CELL[name], hidden, batch, dtype, packed, proj, backward, directions, tf32,
                      sms, shared, coop, arch, want, sync, cluster, code_arch)


@pytest.mark.parametrize("gpu", list(GPUS))
@pytest.mark.parametrize("name", list(CELL))
def test_small_batches_persistent_everywhere(emu, gpu, name):
    """Up to 16 sequences at H=256 the persistent kernels run on every GPU,
    forward and backward, dense and packed, in every dtype; one unit per SM
    or more, as few as cover H; from compute capability 9.0 one
    thread-block cluster of 16 blocks (the cluster exchange)."""
    sms, arch = GPUS[gpu][0], GPUS[gpu][3]
    for dtype in (F32, BF16, F16):
        for backward in (False, True):
            for packed in (False, True):
                path, reason, _, units, blocks, sync = choose(emu, gpu, name, 256, 8, dtype,
                                                              backward=backward, packed=packed)
                assert path == "persistent", reason
                if arch >= 90:
                    assert sync == "cluster" and units == 16 and blocks == 16, reason
                else:
                    assert sync in ("tags", "barrier") and units == -(-256 // sms), reason
                    assert blocks == -(-256 // units)
                assert ("packed sequences" in reason) == packed


@pytest.mark.parametrize("gpu", ["H200", "A100", "L4"])
def test_tensor_cores_by_dtype(emu, gpu):
    for name in CELL:
        assert choose(emu, gpu, name, 256, 64, BF16)[2] == 16
        assert choose(emu, gpu, name, 256, 64, F16)[2] == 16
        assert choose(emu, gpu, name, 256, 64, F32)[2] == 8       # exact FMA, TF32 off
        assert choose(emu, gpu, name, 256, 64, F32, tf32=True)[2] == 16
        assert choose(emu, gpu, name, 256, 8, F32, tf32=True)[2] == 8
        assert choose(emu, gpu, name, 256, 1, BF16)[2] == 1
        assert "tensor cores in TF32" in choose(emu, gpu, name, 256, 64, F32, tf32=True)[1]


def test_turing_without_bfloat16_or_tf32_tensor_cores(emu):
    """A T4 (7.5): float16 on tensor cores; bfloat16 on the FMA tile, saying
    why; float32 exact whatever torch's TF32 flag."""
    for name in CELL:
        assert choose(emu, "T4", name, 256, 64, F16)[2] == 16
        path, reason, tile, *_ = choose(emu, "T4", name, 256, 64, BF16, want="persistent")
        assert path == "persistent" and tile == 1, reason
        assert "wmma multiplies BFloat16 from compute capability 8.0, this GPU has 7.5" in reason
        path, reason, tile, *_ = choose(emu, "T4", name, 256, 64, F32, tf32=True,
                                        want="persistent")
        assert path == "persistent" and tile == 8 and "TF32" not in reason, reason
        assert choose(emu, "T4", name, 256, 8, BF16)[:3:2] == ("persistent", 1)


@pytest.mark.parametrize("code_arch", [75, 80, 90])
def test_features_of_the_code_the_gpu_loads(emu, code_arch):
    """An H100 running a build without sm_90 code (TORCH_CUDA_ARCH_LIST
    "8.0+PTX", "7.5+PTX") runs older PTX, in which the cluster exchange
    (before 9.0) and the bfloat16 and TF32 tensor-core tiles (before 8.0)
    compiled to a trap: the plan takes only what that code has."""
    for name in CELL:
        for backward in (False, True):
            path, reason, tile, _, _, sync = choose(emu, "H100", name, 256, 8, BF16,
                                                     backward=backward, code_arch=code_arch)
            assert path == "persistent", reason
            assert (sync == "cluster") == (code_arch >= 90), reason
            assert (tile == 16) == (code_arch >= 80), reason
            # forcing the cluster exchange cannot take it either
            sync = choose(emu, "H100", name, 256, 8, F32, backward=backward, sync="cluster",
                          code_arch=code_arch)[5]
            assert (sync == "cluster") == (code_arch >= 90)
        path, reason, tile, *_ = choose(emu, "H100", name, 256, 64, F32, tf32=True,
                                        want="persistent", code_arch=code_arch)
        assert path == "persistent" and (tile == 16) == (code_arch >= 80), reason
        assert choose(emu, "H100", name, 256, 64, F16, code_arch=code_arch)[2] == 16
    if code_arch < 80:
        reason = choose(emu, "H100", "LSTM", 256, 64, BF16, code_arch=code_arch)[1]
        assert ("wmma multiplies BFloat16 from compute capability 8.0, and this build runs "
                "the PTX of 7.5 here, having no code for this GPU's 9.0") in reason


@pytest.mark.parametrize("gpu", ["H200", "H100"])
def test_h200_rules(emu, gpu):
    """The automatic rule fitted to the H200 grid (132 SMs): up to 16
    sequences persistent; past that, weight rows x k x batch per block of at
    most 2^18 (2^19 for the tensor-core forward); the tagged exchange where
    its words add at most 4 MiB of L2 reads per step."""
    def path(*a, **k):
        return choose(emu, gpu, *a, **k)[0]

    assert path("LSTM", 1024, 16, F32) == "persistent"
    assert path("LSTM", 256, 64, F32) == "persistent"
    assert path("LSTM", 256, 64, F32, backward=True) == "persistent"
    assert path("LSTM", 512, 64, F32) == "general"
    assert path("LSTM", 512, 64, F32, backward=True) == "general"
    assert path("LSTM", 512, 64, BF16) == "persistent"
    assert path("LSTM", 1024, 64, BF16) == "general"
    assert path("LSTM", 1024, 2048, F32) == "general"
    assert path("LSTM", 8192, 8, F64) == "general"   # far past shared memory
    # forced, the persistent kernel wherever it fits
    assert path("LSTM", 512, 64, F32, want="persistent") == "persistent"
    # the tagged exchange's rule, without clusters
    for name in CELL:
        _, reason, *_, sync = choose(emu, gpu, name, 256, 8, F32, cluster=0)
        assert sync == "tags" and "no grid barrier" in reason
        assert choose(emu, gpu, name, 256, 8, F32, backward=True, cluster=0)[5] == "tags"
        assert choose(emu, gpu, name, 256, 1, F64, cluster=0)[5] == "tags"
        assert choose(emu, gpu, name, 256, 8, F32, sync="barrier")[5] == "barrier"
        assert choose(emu, gpu, name, 256, 8, F32, sync="tags")[5] == "tags"
    assert choose(emu, gpu, "LSTM", 1024, 64, F32, want="persistent")[5] == "barrier"
    # TF32 tiles that would not fit fall back to exact FMA: the LSTM
    # backward at H=1024 holds 8 x 4096 W_hh^T columns per block (128 KiB in
    # float32), 256 KiB padded to 16 rows
    path_, reason, tile, *_ = choose(emu, gpu, "LSTM", 1024, 64, F32, backward=True, tf32=True,
                                     want="persistent")
    assert path_ == "persistent" and tile == 8 and "TF32 is allowed, but" in reason, reason


@pytest.mark.parametrize("gpu", list(GPUS))
def test_paths_requested_and_fallbacks(emu, gpu):
    assert choose(emu, gpu, "GRU", 256, 8, F32, want="general")[0] == "general"
    assert choose(emu, gpu, "GRU", 256, 8, F32, want="stepwise")[0] == "stepwise"
    # projections: folded, the choice for the recurrence of the same hidden
    # size without projection (the kernels get weight_hh @ weight_hr)
    for want in ("auto", "persistent", "stepwise", "general"):
        for H, B, dtype, backward in ((256, 8, F32, False), (256, 8, BF16, True),
                                      (1024, 2048, F32, False), (8192, 8, F64, True)):
            folded = choose(emu, gpu, "LSTM", H, B, dtype, proj=True, backward=backward,
                            want=want)
            plain = choose(emu, gpu, "LSTM", H, B, dtype, backward=backward, want=want)
            assert folded[0] == plain[0], (folded, plain)
            if want == "general":
                assert folded[1].endswith("the general path was requested"), folded[1]
            elif plain[0] == "general":
                assert "LSTM with proj_size per step (W_hh, then W_hr)" in folded[1], folded[1]
                assert folded[1].startswith("general path (a cuBLAS GEMM")
                assert folded[1].count("general path (a cuBLAS GEMM") == 1, folded[1]
            else:
                assert folded[2:] == plain[2:], (folded, plain)  # the same launch plan
                assert folded[1] == "proj_size folded (the recurrence on o * tanh(c), H wide, " \
                    "with weight_hh @ weight_hr; the projection one GEMM after it): " + plain[1]
    assert choose(emu, gpu, "LSTM", 256, 8, F32, proj=True, want="persistent")[0] == "persistent"
    # no cooperative launches (some virtualised GPUs): the same kernels stepwise
    path, reason, *_ = choose(emu, gpu, "LSTM", 256, 8, F32, cooperative=False, cluster=0)
    assert path == "stepwise" and "no cooperative launches" in reason
    # a cluster launch is not cooperative: where one fits, it still runs
    *_, sync = choose(emu, gpu, "LSTM", 256, 8, F32, cooperative=False)
    assert sync == ("cluster" if GPUS[gpu][3] >= 90 else "")
    # past what a block's rows hold: stepwise takes more blocks than SMs
    path, reason, _, units, blocks, _ = choose(emu, gpu, "LSTM", 8192, 1, F32, want="stepwise")
    assert path == "stepwise" and units * blocks >= 8192 and units * 4 <= 64


@pytest.mark.parametrize("gpu", ["H200", "A100"])
def test_both_directions_of_a_layer(emu, gpu):
    """Both directions side by side on half of the SMs each where their
    weights fit so; float32 LSTM forward at H=1024: 8 units (128 KiB of
    W_hh) per block on 132 SMs fit, 16 on 66 SMs (256 KiB) do not."""
    for name in CELL:
        for backward in (False, True):
            path, reason, *_ = choose(emu, gpu, name, 256, 8, F32, backward=backward,
                                      directions=2)
            assert path == "persistent" and "both directions" in reason, reason
    if gpu == "H200":
        assert choose(emu, gpu, "LSTM", 1024, 1, F32, directions=2)[0] == "general"
        assert choose(emu, gpu, "LSTM", 1024, 1, F32)[0] == "persistent"


@pytest.mark.parametrize("gpu", ["H200", "H100"])
def test_cluster_exchange(emu, gpu):
    """From compute capability 9.0: one thread-block cluster of at most 16
    blocks per direction where the weight slices and the window of two
    steps' rows fit in shared memory and a block's work per step is at most
    2^18 (2^20 on tensor cores); FUSED_RNN_GRID_SYNC=cluster wherever it
    fits, tags or barrier never."""
    for name in CELL:
        for backward in (False, True):
            for dtype in (F32, BF16, F16):
                path, reason, _, units, blocks, sync = choose(emu, gpu, name, 256, 8, dtype,
                                                              backward=backward)
                assert path == "persistent" and sync == "cluster", reason
                assert blocks <= 16 and units * blocks >= 256 > units * (blocks - 1)
                assert "one cluster barrier per step" in reason, reason
                for other in ("tags", "barrier"):
                    assert choose(emu, gpu, name, 256, 8, dtype, backward=backward,
                                  sync=other)[5] == other
    # not float64 (for gradcheck and accuracy: no cluster kernels), even forced
    assert choose(emu, gpu, "LSTM", 256, 8, F64)[5] == "tags"
    assert choose(emu, gpu, "LSTM", 256, 8, F64, sync="cluster")[5] == "tags"
    # a small hidden size: fewer blocks, one unit each
    assert choose(emu, gpu, "GRU", 7, 1, F32)[3:] == (1, 7, "cluster")
    # past the work rule the grid of all SMs: float32 LSTM H=256 at B=64
    # (64 x 256 x 64 FMA per block and step); forced, the cluster where it fits
    assert choose(emu, gpu, "LSTM", 256, 64, F32)[5] == "barrier"
    assert choose(emu, gpu, "LSTM", 256, 64, F32, sync="cluster")[5] == "cluster"
    assert choose(emu, gpu, "LSTM", 256, 32, BF16)[5] == "cluster"  # tensor cores: 2^19
    # not on 16 blocks: float32 LSTM H=512 forward (128 weight rows per
    # block, 256 KiB of shared memory); forced, the automatic choice instead
    assert choose(emu, gpu, "LSTM", 512, 1, F32)[5] == "tags"
    assert choose(emu, gpu, "LSTM", 512, 1, F32, sync="cluster")[5] == "tags"
    # the half types' forward at H=512: 32 units, 128 weight rows per block
    # (the tensor-core tile holds 256; the FMA tile at B=1 takes them in
    # rounds of 64 from the window); not the backward (its window of 2 x 16
    # rows of 2048 does not fit beside its slice)
    for dtype in (BF16, F16):
        assert choose(emu, gpu, "LSTM", 512, 8, dtype)[2:] == (16, 32, 16, "cluster")
        assert choose(emu, gpu, "GRU", 512, 8, dtype)[2:] == (16, 32, 16, "cluster")
        assert choose(emu, gpu, "LSTM", 512, 1, dtype)[2:] == (1, 32, 16, "cluster")
        assert choose(emu, gpu, "LSTM", 512, 8, dtype, backward=True)[5] == "barrier"
    # float32 at H=512, B=1: GRU (96 rows, 192 KiB per block), not LSTM (256 KiB)
    assert choose(emu, gpu, "GRU", 512, 1, F32)[2:] == (1, 32, 16, "cluster")
    # both directions of a layer: a cluster each
    _, reason, *_, sync = choose(emu, gpu, "LSTM", 256, 8, F32, directions=2)
    assert sync == "cluster" and "two thread-block clusters" in reason, reason
    # a device without clusters (before 9.0, or none reported)
    assert choose(emu, gpu, "LSTM", 256, 8, F32, cluster=0)[5] == "tags"
    assert choose(emu, "A100", "LSTM", 256, 8, F32)[5] == "tags"
