"""The persistent CUDA kernels' own source (csrc/cuda/persistent.cuh) run on
the CPU through a thread-per-CUDA-thread emulation (tests/emulation/), as
one cooperative launch and as stepwise launches (one per step, the weight
slices packed into global memory; also through the loop that CUDA graphs
replay, on copies of the tensors), on dense and packed input, and compared with the CPU ops: forward outputs, states and saved tensors;
backward state gradients and the gate gradients behind every parameter
gradient. Shapes cover one and several blocks with a ragged last block, one
and several batch tiles with a ragged last tile, one and several column
chunks, forward and reverse time, with and without bias. This runs on every
machine; on a GPU, test_cuda_persistent.py runs the compiled kernels."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_rnn  # noqa: F401  (the CPU ops)
from helpers import EMULATION_CHUNK as CHUNK, make_op_args

# One cooperative launch whose blocks exchange rows tagged (the default on
# a GPU) or meet at a grid barrier; one launch whose blocks form a
# thread-block cluster and put each step's rows into each other's shared
# memory; and one launch per step.
MODES = ["tags", "barrier", "cluster", "stepwise"]
# And one launch per step as the CUDA launcher runs them from a graph
# (through run_as_loop, on copies of the tensors, the call's own NaN
# meanwhile): the tensors and roles the launches are given, on the fixed
# float64 cases and the random launches (the kernels are stepwise's).
ALL_MODES = MODES + ["graphed"]
CELLS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


# (H, B, T, units per block, batch tile[, staged columns]): blocks =
# ceil(H / units); the staged columns as a plan widens them (default: the
# emulation build's CHUNK divided among the tiles side by side)
CONFIGS = {
    "3_blocks_ragged_tile1": (7, 1, 3, 3, 1),
    "ragged_tiles_and_blocks": (31, 10, 3, 11, 8),  # backward k = G*H: several chunks
    "widest_block_2_chunks": (40, 3, 2, 16, 8),     # LSTM: 64 rows, the most a block holds
    "one_unit_per_block": (5, 9, 2, 1, 8),
    # warps left free by the rows take batch tiles side by side: 5 tiles
    # (not a power of two) in one pass, the last ragged
    "tiles_side_by_side": (6, 37, 2, 2, 8),
    # 4 tiles side by side, three passes, the last one partly past the batch
    "several_passes": (8, 70, 2, 4, 8),
    # all columns staged at once (forward k = 31, backward up to 124)
    "whole_rows_staged": (31, 10, 3, 11, 8, 4096),
    # 48 columns at a time: backward k = 124 in 48 + 48 + 28, several passes
    "chunks_of_48": (31, 21, 2, 11, 8, 48),
}


def cpu_reference(cell, a, train=True):
    ops = torch.ops.fused_rnn
    bs = a["batch_sizes"]
    if cell == "lstm":
        return ops.lstm_forward(a["input"], a["hx"], a["cx"], a["w_ih"], a["w_hh"], a["b_ih"],
                                a["b_hh"], None, bs, a["reverse"], train)
    if cell == "gru":
        return ops.gru_forward(a["input"], a["hx"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                               bs, a["reverse"], train)
    return ops.rnn_forward(a["input"], a["hx"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], bs,
                           a["reverse"], a["relu"])


def cpu_backward(cell, a, ref, grads, has_bias):
    """The CPU backward op of `cell` (lstm, gru, rnn) on the op arguments `a`
    and their training forward `ref` (cpu_reference), for the gradients
    grads = (output (N, H), hy, cy) of its outputs."""
    ops = torch.ops.fused_rnn
    go, ghy, gcy = grads
    go = go.view(ref[0].shape)
    bs, reverse = a["batch_sizes"], a["reverse"]
    if cell == "lstm":
        return ops.lstm_backward(go, ghy, gcy, a["input"], a["hx"], a["cx"], a["w_ih"],
                                 a["w_hh"], None, ref[0], ref[3], ref[4], bs, reverse, has_bias,
                                 True)
    if cell == "gru":
        return ops.gru_backward(go, ghy, a["input"], a["hx"], a["w_ih"], a["w_hh"], ref[0],
                                ref[2], ref[3], bs, reverse, has_bias, True)
    return ops.rnn_backward(go, ghy, a["input"], a["hx"], a["w_ih"], a["w_hh"], ref[0], bs,
                            reverse, a["relu"], has_bias, True)


def close(actual, expected, what, dtype):
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=what)


@pytest.mark.parametrize("order", [0, 1], ids=["ascending", "descending"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("mode", ALL_MODES)
def test_emulated_kernels_match_cpu_ops(emu, mode, cell, config, reverse, bias, order,
                                        dtype=torch.float64):
    """Thread order: the threads of each phase between barriers run in
    ascending or descending order; a missing barrier shows in one of them.
    Tags: one cooperative launch whose blocks pass each step's rows through
    the tagged ring (a reader waits, yielding, until the tag of its step is
    there; a wrong slot or tag never arrives and shows as a deadlock).
    Barrier: the grid barrier per step instead. Stepwise: the same kernels
    one launch per step, the weight slices packed into global memory first
    (a fresh shared memory, filled with garbage, at every launch)."""
    H, B, T, units, tile, *chunk = CONFIGS[config]
    a = make_op_args(cell.split("_")[0], T=T, B=B, I=5, H=H, bias=bias, reverse=reverse,
                     dtype=dtype, relu=cell == "rnn_relu")
    check_kernels(emu, cell, a, units, tile, order, mode, dtype, chunk=(chunk or [0])[0])


# (lengths, units per block, batch tile); reverse walks the steps of growing
# size, where sequences start at different steps.
PACKED = {
    "ragged_tile1": ((4, 2, 2, 1), 3, 1),
    "several_tiles_side_by_side": ((5, 5, 4, 3, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1), 2,
                                   8),
    "one_sequence": ((3,), 4, 1),
}


@pytest.mark.parametrize("order", [0, 1], ids=["ascending", "descending"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", list(PACKED))
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("mode", ALL_MODES)
def test_emulated_packed(emu, mode, cell, packed, reverse, order, dtype=torch.float64):
    """Packed sequences, in one cooperative launch (each step's rows from
    the step table; tagged exchange or grid barrier) and stepwise (each
    launch given its rows): the
    sequences that end early (hy, cy; grad_hy, grad_cy enter there) and, in
    reverse, those that start late (from hx, cx; grad_hx, grad_cx leave
    there)."""
    lengths, units, tile = PACKED[packed]
    a = make_op_args(cell.split("_")[0], B=len(lengths), I=5, H=7, lengths=lengths,
                     reverse=reverse, dtype=dtype, relu=cell == "rnn_relu")
    check_kernels(emu, cell, a, units, tile, order, mode, dtype)


# Both directions of a bidirectional layer side by side in one launch (the
# _pair ops on CUDA): (H, B, T, units, tile) dense, or (lengths, units, tile)
# packed, where the two directions' steps have different rows.
PAIRED = {
    "dense_ragged_tiles_and_blocks": CONFIGS["ragged_tiles_and_blocks"],
    "dense_3_blocks_tile1": CONFIGS["3_blocks_ragged_tile1"],
    "packed_ragged_tile1": PACKED["ragged_tile1"],
    "packed_tiles_side_by_side": PACKED["several_tiles_side_by_side"],
}


def paired_args(cell, case, reverse, **kw):
    """The op arguments of two directions of a layer over the same rows (the
    second walks the other way, with other weights and states)."""
    config = PAIRED[case]
    if isinstance(config[0], tuple):
        lengths, units, tile = config
        shape = dict(B=len(lengths), I=5, H=7, lengths=lengths)
    else:
        H, B, T, units, tile = config
        shape = dict(T=T, B=B, I=5, H=H)
    cases = [make_op_args(cell.split("_")[0], reverse=r, seed=seed, relu=cell == "rnn_relu",
                          **shape, **kw)
             for seed, r in ((0, reverse), (1, not reverse))]
    return cases, units, tile


@pytest.mark.parametrize("order", [0, 1], ids=["ascending", "descending"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward_first", "reverse_first"])
@pytest.mark.parametrize("case", list(PAIRED))
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("mode", ALL_MODES)
def test_emulated_both_directions(emu, mode, cell, case, reverse, order):
    """Both directions of a layer in one launch: the blocks of the second
    direction after the first's, each direction with its own tensors, ring
    and time order, the grid barrier shared; each direction against the CPU
    ops, forward and backward."""
    (a, b), units, tile = paired_args(cell, case, reverse, dtype=torch.float64)
    check_kernels(emu, cell, a, units, tile, order, mode, torch.float64, paired_with=b)


def launch_kw(mode, batch_sizes=None, chunk=0, paired=False):
    """The emulated ops' launch arguments for a mode of ALL_MODES."""
    return dict(stepwise=mode in ("stepwise", "graphed"), tagged=mode == "tags",
                batch_sizes=batch_sizes, chunk=chunk, paired=paired, graphed=mode == "graphed",
                cluster=mode == "cluster")


def stacked(values):
    """One argument of the emulated ops for the directions of a launch: the
    tensor of one direction, both stacked along a new first dimension when
    paired (None where absent)."""
    if values[0] is None:
        return None
    return values[0] if len(values) == 1 else torch.stack(values)


def per_direction(outputs, count):
    """The emulated ops' outputs of each direction."""
    return [list(outputs)] if count == 1 else [[t[d] for t in outputs] for d in range(count)]


def check_kernels(emu, cell, a, units, tile, order, mode, dtype, chunk=0, paired_with=None):
    """The emulated forward and backward kernels on the op arguments `a`
    (dense or packed) against the CPU ops; paired_with: the arguments of a
    second direction (the other way in time, the same shapes and rows) run
    side by side with `a` in the same launches."""
    cases = [a] if paired_with is None else [a, paired_with]
    count = len(cases)
    op_cell = cell.split("_")[0]
    bias = a["b_ih"] is not None
    reverse, bs = a["reverse"], a["batch_sizes"]
    B, H = a["hx"].shape
    T = len(bs) if bs is not None else a["input"].shape[0]
    N = a["input"].reshape(-1, a["input"].shape[-1]).shape[0]
    kw = launch_kw(mode, bs, chunk, paired=count == 2)

    def arg(fn):
        return stacked([fn(c) for c in cases])

    refs = [cpu_reference(op_cell, c) for c in cases]
    xs = [c["input"].reshape(N, -1) for c in cases]
    if cell == "gru":
        biases = [(c["b_ih"], c["b_hh"]) for c in cases]
    else:
        biases = [((c["b_ih"] + c["b_hh"]) if bias else None, None) for c in cases]
    outs = per_direction(emu.forward(
        CELLS[cell], stacked([x @ c["w_ih"].t() for x, c in zip(xs, cases)]),
        stacked([b[0] for b in biases]), stacked([b[1] for b in biases]), arg(lambda c: c["w_hh"]),
        arg(lambda c: c["hx"]), arg(lambda c: c.get("cx")), T, B, reverse,
        cell in ("lstm", "gru"), units, tile, order, **kw), count)
    for d, (ref, (out, hy, cy, gates, cells, hn)) in enumerate(zip(refs, outs)):
        what = f" (direction {d} of {count})"
        close(out, ref[0].reshape(N, H), "output" + what, dtype)
        close(hy, ref[1], "hy" + what, dtype)
        if cell == "lstm":
            close(cy, ref[2], "cy" + what, dtype)
            close(gates, ref[3], "activated gates" + what, dtype)
            close(cells, ref[4], "cells" + what, dtype)
        if cell == "gru":
            close(gates, ref[2], "activated gates" + what, dtype)
            close(hn, ref[3], "hidden_n" + what, dtype)

    # backward from the same saved tensors, against the CPU backward op
    gen = torch.Generator().manual_seed(5)
    grads = [(torch.randn(N, H, generator=gen, dtype=dtype),
              torch.randn(B, H, generator=gen, dtype=dtype),
              torch.randn(B, H, generator=gen, dtype=dtype)) for _ in cases]
    go, ghy, gcy = (stacked([g[i] for g in grads]) for i in range(3))
    expected = [cpu_backward(op_cell, c, ref, g, bias) for c, ref, g in zip(cases, refs, grads)]
    w_hh = arg(lambda c: c["w_hh"])
    if cell == "lstm":
        results = emu.backward(0, w_hh, go, ghy, gcy, None, None, arg(lambda c: c["cx"]),
                               stacked([ref[3] for ref in refs]),
                               stacked([ref[4] for ref in refs]), None, T, B, reverse, units,
                               tile, order, **kw)
    elif cell == "gru":
        results = emu.backward(1, w_hh, go, ghy, None,
                               stacked([ref[0].reshape(N, H) for ref in refs]),
                               arg(lambda c: c["hx"]), None, stacked([ref[2] for ref in refs]),
                               None, stacked([ref[3] for ref in refs]), T, B, reverse, units,
                               tile, order, **kw)
    else:
        results = emu.backward(CELLS[cell], w_hh, go, ghy, None,
                               stacked([ref[0].reshape(N, H) for ref in refs]), None, None,
                               None, None, None, T, B, reverse, units, tile, order, **kw)
    for d, (c, x, exp, (dg, dgh, ghx, gcx)) in enumerate(
            zip(cases, xs, expected, per_direction(results, count))):
        what = f" (direction {d} of {count})"
        if cell == "lstm":
            close(gcx, exp[2], "grad_cx" + what, dtype)
        if cell == "gru" and bias:
            close(dgh.sum(0), exp[5], "grad_b_hh" + what, dtype)
        close(ghx, exp[1], "grad_hx" + what, dtype)
        close((dg @ c["w_ih"]).view(c["input"].shape), exp[0], "grad_input" + what, dtype)
        grad_w_ih = exp[3] if cell == "lstm" else exp[2]
        close(dg.t() @ x, grad_w_ih, "grad_w_ih" + what, dtype)
        if bias:
            grad_bias = exp[5] if cell == "lstm" else exp[4]
            close(dg.sum(0), grad_bias, "grad_bias" + what, dtype)


def rel_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() /
            expected.double().abs().max().clamp_min(1e-30)).item()


# (batch tile, staged columns, packed lengths, H) of the low-precision
# cases; the batch tile: True the dtype's wide tile (40 sequences), False
# one sequence (tile 1), "fma" 40 sequences on tile 1 (the half types on
# GPUs without their tensor cores: bfloat16 before compute capability 8.0).
# H=31 stages element by element; H=32 (rows of whole 16-byte pieces in
# float32 and the half types) 16 bytes per load, except from the tagged
# ring.
LOW_PRECISION = {
    "wide_tile": (True, 0, None, 31),
    "wide_tile_all_columns": (True, 4096, None, 31),
    # 40 sequences of lengths 3, 2 and 1: the tensor-core tiles over ragged steps
    "wide_tile_packed": (True, 0, (3,) * 17 + (2,) * 13 + (1,) * 10, 31),
    "one_sequence": (False, 0, None, 31),
    "wide_tile_16_bytes": (True, 0, None, 32),
    "wide_tile_all_columns_16_bytes": (True, 4096, None, 32),
    "wide_tile_packed_16_bytes": (True, 0, (3,) * 17 + (2,) * 13 + (1,) * 10, 32),
    "one_sequence_16_bytes": (False, 0, None, 32),
    "batch_on_fma_tile": ("fma", 0, None, 31),
    "batch_on_fma_tile_packed_16_bytes": ("fma", 0, (3,) * 17 + (2,) * 13 + (1,) * 10, 32),
}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(LOW_PRECISION))
def test_emulated_low_precision(emu, case, mode, cell, dtype, reverse):
    """float32 (FMA tile) and float16 / bfloat16 (tensor-core tile: wmma
    16x16x16, rows and columns padded to 16, two batch tiles side by side
    and a second pass with one, past the batch; the columns staged in
    chunks or all at once; dense or packed input), forward and backward,
    against the CPU ops in float64 on the same (rounded) inputs: within a
    few roundings of the storage type. One sequence: batch tile 1, FMA in
    every dtype (the half types staged as float32); batch_on_fma_tile*: 40
    sequences on tile 1, as bfloat16 runs on GPUs without its tensor cores."""
    check_low_precision(emu, case, mode, cell, dtype, [reverse])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["wide_tile", "wide_tile_packed", "one_sequence",
                                  "wide_tile_16_bytes", "one_sequence_16_bytes",
                                  "batch_on_fma_tile"])
def test_emulated_low_precision_both_directions(emu, case, mode, cell, dtype):
    """The paired kernels (both directions of a layer in one launch, their
    own instantiations) in the low-precision dtypes and both batch tiles,
    each direction against the CPU ops in float64."""
    check_low_precision(emu, case, mode, cell, dtype, [False, True])


@pytest.mark.parametrize("directions", [[False], [True], [False, True]],
                         ids=["forward", "reverse", "paired"])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["wide_tile", "wide_tile_all_columns", "wide_tile_packed",
                                  "wide_tile_16_bytes", "wide_tile_packed_16_bytes"])
def test_emulated_tf32(emu, case, mode, cell, directions):
    """float32 on the tensor-core tile (where torch allows TF32 for cuDNN's
    RNNs): wmma 16x16x8 in TF32, both operands rounded to TF32 (10 mantissa
    bits, as cvt.rna.tf32.f32), fp32 accumulation, one direction or both
    side by side: within TF32's rounding of the CPU ops in float64, and
    measurably rounded (further from them than the exact FMA tile)."""
    check_low_precision(emu, case, mode, cell, torch.float32, directions, tf32=True)


@pytest.mark.parametrize("batch, dtype, tf32, arch, tile", [
    (1, torch.float16, False, 90, 1),
    (1, torch.float32, True, 90, 1),
    (2, torch.float16, False, 70, 16),    # Volta and Turing multiply half on tensor cores
    (64, torch.float16, False, 75, 16),
    (64, torch.bfloat16, False, 75, 1),   # but not bfloat16: FMA, a sequence per tile
    (64, torch.bfloat16, False, 80, 16),
    (64, torch.bfloat16, False, 90, 16),
    (64, torch.float32, True, 75, 8),     # no TF32 before Ampere: exact FMA
    (64, torch.float32, True, 80, 16),
    (64, torch.float32, False, 90, 8),    # TF32 not allowed
    (8, torch.float32, True, 90, 8),      # the FMA tile covers 8 sequences in one pass
    (9, torch.float32, True, 86, 16),
    (64, torch.float64, True, 90, 8),
])
def test_batch_tile_by_architecture(emu, batch, dtype, tf32, arch, tile):
    """The launcher's batch tile on a GPU of compute capability arch / 10:
    tensor cores only where the GPU has them for the dtype (float16 from
    7.0, bfloat16 and TF32 from 8.0; sm_7x builds compile those tiles to a
    trap), the FMA tiles elsewhere."""
    assert emu.batch_tile(batch, dtype, tf32, arch) == tile


# More weight rows per block than the FMA product holds (64): the
# tensor-core product gives each warp a row group of 16 (up to 256 rows),
# which the cluster exchange takes for H=512 in the half types (LSTM forward:
# 32 units, 128 rows per block). Here LSTM 96 rows, GRU 72 (24 units of
# H=48, two blocks), the RNNs 24.
MANY_ROWS_UNITS = 24
LOW_PRECISION_MANY_ROWS = {"wide_tile_many_rows": (True, 0, None, 48)}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("mode", MODES)
def test_emulated_tensor_core_rows_past_64(emu, mode, cell, dtype, reverse):
    """Blocks of more than 64 weight rows on the tensor-core tile (every
    mode, one direction and both), against the CPU ops in float64."""
    check_low_precision(emu, "wide_tile_many_rows", mode, cell, dtype, [reverse])
    check_low_precision(emu, "wide_tile_many_rows", mode, cell, dtype, [False, True])
    # the FMA tile holds no more than 64: refused, not run
    with pytest.raises(RuntimeError, match="too many rows per block"):
        emu.forward(CELLS[cell], torch.zeros(3, 3 * 48), None, None, torch.zeros(3 * 48, 48),
                    torch.zeros(1, 48), None, 3, 1, False, False, MANY_ROWS_UNITS, 1, 0)


@pytest.mark.parametrize("order", [0, 1], ids=["ascending", "descending"])
@pytest.mark.parametrize("tile", [1, 8])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("packed", [False, True])
def test_emulated_fma_rows_past_64_in_a_cluster(emu, packed, cell, tile, order):
    """The FMA product with more row groups than warps (LSTM 84 rows, GRU
    126: 21 and 42 units per block of H=42 or 84), taken in rounds,
    where a cluster's window holds the whole rows (the half types at H=512
    and B=1 on 16 blocks); in float64 against the CPU ops, one direction
    and both. Elsewhere such a block is refused, never run."""
    units = 42 if cell == "gru" else 21
    H = 2 * units
    shape = dict(B=4, I=5, H=H, lengths=(3, 3, 2, 1)) if packed else dict(T=3, B=10, I=5, H=H)
    a = make_op_args(cell, reverse=False, dtype=torch.float64, **shape)
    b = make_op_args(cell, reverse=True, dtype=torch.float64, seed=1, **shape)
    check_kernels(emu, cell, a, units, tile, order, "cluster", torch.float64)
    check_kernels(emu, cell, a, units, tile, order, "cluster", torch.float64, paired_with=b)
    for mode in ("tags", "barrier", "stepwise"):
        with pytest.raises(RuntimeError, match="too many rows per block"):
            check_kernels(emu, cell, a, units, tile, order, mode, torch.float64)


def check_low_precision(emu, case, mode, cell, dtype, directions, tf32=False):
    """The emulated kernels on LOW_PRECISION[case] in `dtype`, one direction
    (directions [reverse]) or two side by side ([False, True], other
    weights and states each), against the CPU ops in float64. tf32: float32
    on the tensor-core tile."""
    wide, chunk, lengths, H = {**LOW_PRECISION, **LOW_PRECISION_MANY_ROWS}[case]
    T = 3
    units = MANY_ROWS_UNITS if case == "wide_tile_many_rows" else 11
    B = 40 if wide else 1
    tile = (16 if tf32 or dtype != torch.float32 else 8) if wide is True else 1
    op_cell = cell.split("_")[0]
    cases = [make_op_args(op_cell, T=T, B=B, I=5, H=H, dtype=dtype, reverse=r, seed=seed,
                          relu=cell == "rnn_relu", lengths=lengths)
             for seed, r in enumerate(directions)]
    count = len(cases)
    a = cases[0]
    cases64 = [{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in c.items()} for c in cases]
    bs = a["batch_sizes"]
    refs = [cpu_reference(op_cell, c64) for c64 in cases64]
    xs = [c["input"].reshape(-1, c["input"].shape[-1]) for c in cases]
    N = xs[0].shape[0]

    def arg(fn):
        return stacked([fn(c) for c in cases])

    xw = stacked([(x.double() @ c64["w_ih"].t()).to(dtype) for x, c64 in zip(xs, cases64)])
    if cell == "gru":
        bias_in, bias_hh = arg(lambda c: c["b_ih"]), arg(lambda c: c["b_hh"])
    else:
        bias_in, bias_hh = arg(lambda c: c["b_ih"] + c["b_hh"]), None
    kw = launch_kw(mode, bs, chunk, paired=count == 2)
    forward = emu.forward(CELLS[cell], xw, bias_in, bias_hh, arg(lambda c: c["w_hh"]),
                          arg(lambda c: c["hx"]), arg(lambda c: c.get("cx")), T, B,
                          directions[0], True, units, tile, 0, **kw)
    # TF32 keeps float16's 10 mantissa bits (its results stay float32)
    tol = 4e-3 if tf32 else {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for ref, (out, hy, cy, *_) in zip(refs, per_direction(forward, count)):
        assert rel_error(out, ref[0].reshape(N, H)) < tol
        if tf32:  # the exact FMA tile is within 1e-5 (test_emulated_low_precision)
            assert rel_error(out, ref[0].reshape(N, H)) > 2e-5, "no TF32 rounding"
        assert rel_error(hy, ref[1]) < tol
        if cell == "lstm":
            assert rel_error(cy, ref[2]) < tol
    if cell == "rnn_relu" and (dtype != torch.float32 or tf32):
        return  # relu's gradient is discontinuous: a half-precision sign flip changes it by O(1)

    gen = torch.Generator().manual_seed(5)
    grads = [(torch.randn(N, H, generator=gen, dtype=torch.float64),
              torch.randn(B, H, generator=gen, dtype=torch.float64),
              torch.randn(B, H, generator=gen, dtype=torch.float64)) for _ in cases]
    go, ghy, gcy = (stacked([g[i].to(dtype) for g in grads]) for i in range(3))
    expected = [cpu_backward(op_cell, c64, ref, g, True)
                for c64, ref, g in zip(cases64, refs, grads)]
    out, hy, cy, gates, cells, hn = forward
    w_hh = arg(lambda c: c["w_hh"])
    if cell == "lstm":
        results = emu.backward(0, w_hh, go, ghy, gcy, None, None, arg(lambda c: c["cx"]), gates,
                               cells, None, T, B, directions[0], units, tile, 0, **kw)
    elif cell == "gru":
        results = emu.backward(1, w_hh, go, ghy, None, out, arg(lambda c: c["hx"]), None, gates,
                               None, hn, T, B, directions[0], units, tile, 0, **kw)
    else:
        results = emu.backward(CELLS[cell], w_hh, go, ghy, None, out, None, None, None, None,
                               None, T, B, directions[0], units, tile, 0, **kw)
    for c64, exp, (dg, _, ghx, gcx) in zip(cases64, expected, per_direction(results, count)):
        if cell == "lstm":
            assert rel_error(gcx, exp[2]) < tol
        assert rel_error(ghx, exp[1]) < 2 * tol
        assert rel_error(dg.double() @ c64["w_ih"], exp[0].reshape(N, -1)) < 2 * tol
        if tf32:
            assert rel_error(ghx, exp[1]) > 2e-5, "no TF32 rounding in the backward product"


@st.composite
def launches(draw):
    """A random emulated launch: cell, hidden size, units per block (at most
    5 blocks, rows within a block's limits), batch tile, dense (T, B) or
    packed (random sorted lengths), staged columns, direction, bias, the
    way blocks meet between steps and the thread order."""
    cell = draw(st.sampled_from(list(CELLS)))
    H = draw(st.integers(1, 40))
    tile = draw(st.sampled_from([1, 8]))
    most = min(H, 64 // GATES[cell])
    units = draw(st.integers(min(most, -(-H // 5)), most))
    lengths = None
    if draw(st.booleans()):
        lengths = tuple(sorted(draw(st.lists(st.integers(1, 5), min_size=1, max_size=20)),
                               reverse=True))
    return dict(cell=cell, H=H, units=units, tile=tile, lengths=lengths,
                B=len(lengths) if lengths else draw(st.integers(1, 20)),
                T=draw(st.integers(1, 4)), chunk=draw(st.sampled_from([0, 16, 48, 4096])),
                reverse=draw(st.booleans()), bias=draw(st.booleans()),
                mode=draw(st.sampled_from(ALL_MODES)), order=draw(st.sampled_from([0, 1])),
                paired=draw(st.booleans()))


@settings(max_examples=60, deadline=None)
@given(launch=launches())
def test_emulated_random_launches(emu, launch):
    """Random combinations of what the fixed cases cover one at a time:
    packed rows over several passes and ragged tiles, chunked or whole
    staging, the tagged ring, reverse time, both directions in one launch;
    float64 against the CPU ops."""
    cell, lengths = launch["cell"], launch["lengths"]
    kw = dict(lengths=lengths) if lengths else dict(T=launch["T"])
    a, b = (make_op_args(cell.split("_")[0], B=launch["B"], I=4, H=launch["H"],
                         bias=launch["bias"], reverse=launch["reverse"] != (seed == 1),
                         dtype=torch.float64, relu=cell == "rnn_relu", seed=seed, **kw)
            for seed in (0, 1))
    check_kernels(emu, cell, a, launch["units"], launch["tile"], launch["order"],
                  launch["mode"], torch.float64, chunk=launch["chunk"],
                  paired_with=b if launch["paired"] else None)


@settings(max_examples=40, deadline=None)
@given(launch=launches(), aligned=st.booleans())
def test_emulated_random_launches_float32(emu, launch, aligned):
    """The same random launches in float32 on the FMA tiles, against the
    CPU ops in float32: half of them with H a multiple of 4, whose rows the
    plain staging (grid barrier, stepwise) loads 16 bytes at a time."""
    cell, lengths = launch["cell"], launch["lengths"]
    H = launch["H"]
    if aligned:
        H = 4 * (-(-H // 4))
    units = min(launch["units"], 64 // GATES[cell], H)
    units = max(units, -(-H // 5))
    if units * GATES[cell] > 64:
        units = 64 // GATES[cell]
    kw = dict(lengths=lengths) if lengths else dict(T=launch["T"])
    a, b = (make_op_args(cell.split("_")[0], B=launch["B"], I=4, H=H, bias=launch["bias"],
                         reverse=launch["reverse"] != (seed == 1), dtype=torch.float32,
                         relu=cell == "rnn_relu", seed=seed, **kw)
            for seed in (0, 1))
    check_kernels(emu, cell, a, units, launch["tile"], launch["order"], launch["mode"],
                  torch.float32, chunk=launch["chunk"],
                  paired_with=b if launch["paired"] else None)
