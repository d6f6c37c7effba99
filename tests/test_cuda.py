"""The CUDA side: parity with torch.nn (cuDNN) in float32 / float64 and, by
the twice-cuDNN's-error rule against torch.nn in float64 on the CPU, in
float16 / bfloat16; sizes on every kernel path (small hidden sizes for the
persistent path, large ones past on-chip memory for the stepwise and
general paths); gradcheck and opcheck of the ops on CUDA; torch.compile;
convert keeps the device; a CUDA graph capture / replay of a whole training
step matched to eager; `fused-rnn check` on every path. Every test is
skipped without a GPU."""

import copy

import pytest
import torch

import fused_rnn
from helpers import (
    gradcheck_op,
    CELL_MODES,
    MODES,
    Cfg,
    assert_results_close,
    call_reference,
    call_wrapper,
    check_cell_parity,
    check_module_parity,
    make_module_inputs,
    make_module_twins,
    make_op_args,
    run_module,
    tf32_flags,
    upstream_like,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
pytestmark = requires_cuda

DEVICE = "cuda"


def no_tf32():
    """cuDNN may use TF32 for float32 RNNs by default, and so may fused_rnn's
    persistent kernels past 8 sequences (they follow the same flag); parity
    in float32 is checked in true float32 on both sides."""
    return tf32_flags(cudnn=False, matmul=False)


@pytest.fixture(params=["persistent", "stepwise", "general", "graphed"])
def path(request):
    """Every CUDA kernel path: the persistent kernels wherever they fit
    (packed sequences included), the same kernels one launch per step
    (stepwise), and the per-step general path (proj_size folds its
    projection into the recurrent weight on the first two), without CUDA
    graphs and (graphed) with every loop captured at its first call and
    replayed from its own copies of the tensors."""
    kernel = "general" if request.param == "graphed" else request.param
    graphs = "always" if request.param == "graphed" else "off"
    with fused_rnn.kernel_path(kernel), fused_rnn.cuda_graphs(graphs):
        yield request.param


FEATURES = {
    "base": Cfg(),
    "no_hx_l3": Cfg(num_layers=3, hx=False, input_size=3, hidden_size=7),
    "bidir_bf_nobias": Cfg(bidirectional=True, num_layers=2, batch_first=True, bias=False),
    "size1": Cfg(input_size=1, hidden_size=2, seq_len=1, batch=1),
    "packed_unsorted_bidir": Cfg(lengths=(2, 5, 1, 4, 3), enforce_sorted=False, num_layers=2,
                                 bidirectional=True),
    "packed_sorted": Cfg(lengths=(5, 3, 3, 1)),
    "unbatched": Cfg(unbatched=True, num_layers=2, bidirectional=True),
    # kernel paths: weights that fit on chip (persistent) and that do not (general)
    "hidden256_batch8": Cfg(input_size=64, hidden_size=256, seq_len=16, batch=8),
    "hidden256_batch64": Cfg(input_size=32, hidden_size=256, seq_len=6, batch=64,
                             bidirectional=True),
    "hidden1024": Cfg(input_size=32, hidden_size=1024, seq_len=4, batch=3),
    "hidden2048": Cfg(input_size=16, hidden_size=2048, seq_len=3, batch=2),
}

FAST = ["base", "no_hx_l3", "bidir_bf_nobias", "size1", "packed_unsorted_bidir",
        "packed_sorted", "unbatched"]


def with_mode(cfg, mode):
    return cfg.replace(mode=mode)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("mode", MODES)
def test_cuda_parity_float32(mode, feature, path):
    with no_tf32():
        check_module_parity(with_mode(FEATURES[feature], mode), torch.float32, device=DEVICE)


@pytest.mark.parametrize("feature", FAST + ["hidden256_batch8"])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_parity_float64(mode, feature, path):
    check_module_parity(with_mode(FEATURES[feature], mode), torch.float64, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feature", ["base", "packed_unsorted_bidir", "hidden256_batch8",
                                     "hidden256_batch64", "hidden1024"])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_parity_half(mode, feature, dtype, path):
    check_module_parity(with_mode(FEATURES[feature], mode), dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", CELL_MODES)
def test_cuda_cell_parity(mode, dtype):
    with no_tf32():
        check_cell_parity(mode, 7, 17, 3, dtype=dtype, device=DEVICE)
        check_cell_parity(mode, 5, 3, 1, unbatched=True, hx=False, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("mode", MODES)
def test_cuda_dropout_same_seed(mode):
    """cuDNN draws its dropout masks from its own state, so on CUDA there is
    no mask to match: the same seed gives the same result, another seed
    another one."""
    cfg = Cfg(mode=mode, num_layers=3, dropout=0.5, bidirectional=True)
    _, fused = make_module_twins(cfg, torch.float64, device=DEVICE)
    fused.train()
    inputs = make_module_inputs(cfg, torch.float64, device=DEVICE)
    a = run_module(fused, inputs, dropout_seed=3)
    b = run_module(fused, inputs, dropout_seed=3)
    c = run_module(fused, inputs, dropout_seed=4)
    assert_results_close(a, b, what="same seed, same result")
    assert not torch.allclose(a["output"], c["output"])


def test_cuda_autocast():
    cfg = Cfg(mode="LSTM", num_layers=2, bidirectional=True)
    ref, fused = make_module_twins(cfg, torch.float32, device=DEVICE)
    inputs = make_module_inputs(cfg, torch.float32, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.float16):
        out_f, _ = fused(inputs["x"], inputs["hx"])
        out_r, _ = ref(inputs["x"], inputs["hx"])
    assert out_f.dtype == out_r.dtype
    torch.testing.assert_close(out_f.float(), out_r.float(), atol=5e-3, rtol=5e-3)


def test_cuda_device_mismatch_same_error():
    cfg = Cfg(mode="LSTM")
    ref, fused = make_module_twins(cfg, torch.float32)  # CPU weights
    x = torch.randn(3, 2, cfg.input_size, device=DEVICE)
    with pytest.raises(Exception) as info:
        ref(x)
    with pytest.raises(type(info.value)):
        fused(x)


def test_cuda_non_default_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    cfg = Cfg(mode="GRU", num_layers=2)
    with no_tf32():
        check_module_parity(cfg, torch.float32, device="cuda:1")


# --------------------------------------------------------------------------
# ops: gradcheck, opcheck
# --------------------------------------------------------------------------

CELLS = {"lstm": ("lstm", {}), "lstm_proj": ("lstm", {"P": 2}), "gru": ("gru", {}),
         "rnn_tanh": ("rnn", {"relu": False}), "rnn_relu": ("rnn", {"relu": True})}
OP_VARIANTS = {"dense": {}, "packed_reverse": {"lengths": (3, 3, 1), "B": 3, "reverse": True},
               "no_bias_reverse": {"bias": False, "reverse": True}}


@pytest.mark.parametrize("variant", list(OP_VARIANTS))
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_cuda_gradcheck_ops(cell_key, variant, path):
    cell, extra = CELLS[cell_key]
    kw = dict(T=3, B=2, I=3, H=3)
    kw.update(extra)
    kw.update(OP_VARIANTS[variant])
    args = make_op_args(cell, requires_grad=True, device=DEVICE, **kw)
    assert gradcheck_op(cell, args)


@pytest.mark.parametrize("variant", list(OP_VARIANTS))
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_cuda_ops_match_reference(cell_key, variant, path):
    cell, extra = CELLS[cell_key]
    args = make_op_args(cell, requires_grad=True, device=DEVICE, **extra,
                        **OP_VARIANTS[variant])
    res = []
    for fn in (call_wrapper, call_reference):
        outs = [o for o in fn(cell, args) if o is not None]
        leaves = [(k, v) for k, v in args.items()
                  if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = torch.autograd.grad(outs, [v for _, v in leaves], upstream_like(outs, 3))
        r = {f"out{i}": o.detach() for i, o in enumerate(outs)}
        r.update({"grad_" + k: g for (k, _), g in zip(leaves, grads)})
        res.append(r)
    assert_results_close(res[0], res[1], what=f"cuda ops.{cell} {variant}")


def _forward_op(cell, a, train):
    ops = torch.ops.fused_rnn
    if cell == "lstm":
        return ops.lstm_forward.default, (a["input"], a["hx"], a["cx"], a["w_ih"], a["w_hh"],
                                          a["b_ih"], a["b_hh"], a["w_hr"], a["batch_sizes"],
                                          a["reverse"], train)
    if cell == "gru":
        return ops.gru_forward.default, (a["input"], a["hx"], a["w_ih"], a["w_hh"], a["b_ih"],
                                         a["b_hh"], a["batch_sizes"], a["reverse"], train)
    return ops.rnn_forward.default, (a["input"], a["hx"], a["w_ih"], a["w_hh"], a["b_ih"],
                                     a["b_hh"], a["batch_sizes"], a["reverse"], a["relu"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("variant", list(OP_VARIANTS))
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_cuda_opcheck(cell_key, variant, train, dtype):
    cell, extra = CELLS[cell_key]
    args = make_op_args(cell, T=3, I=3, H=4, dtype=dtype, device=DEVICE, requires_grad=train,
                        **extra, **OP_VARIANTS[variant])
    op, op_args = _forward_op(cell, args, train)
    torch.library.opcheck(op, op_args)
    if not train:
        return
    # backward op from a train=True forward
    plain = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    op, op_args = _forward_op(cell, plain, True)
    fwd = op(*op_args)
    n_out = 3 if cell == "lstm" else 2
    grads = upstream_like(fwd[:n_out], 1)
    has_bias = plain["b_ih"] is not None
    p = plain
    if cell == "lstm":
        bargs = (grads[0], grads[1], grads[2], p["input"], p["hx"], p["cx"], p["w_ih"], p["w_hh"],
                 p["w_hr"], fwd[0], fwd[3], fwd[4], p["batch_sizes"], p["reverse"], has_bias,
                 True)
        bop = torch.ops.fused_rnn.lstm_backward.default
    elif cell == "gru":
        bargs = (grads[0], grads[1], p["input"], p["hx"], p["w_ih"], p["w_hh"], fwd[0], fwd[2],
                 fwd[3], p["batch_sizes"], p["reverse"], has_bias, True)
        bop = torch.ops.fused_rnn.gru_backward.default
    else:
        bargs = (grads[0], grads[1], p["input"], p["hx"], p["w_ih"], p["w_hh"], fwd[0],
                 p["batch_sizes"], p["reverse"], p["relu"], has_bias, True)
        bop = torch.ops.fused_rnn.rnn_backward.default
    torch.library.opcheck(bop, bargs)


# --------------------------------------------------------------------------
# compile, convert
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
def test_cuda_compile(mode):
    torch._dynamo.reset()
    cfg = Cfg(mode=mode, num_layers=2, bidirectional=True)
    _, fused = make_module_twins(cfg, torch.float32, device=DEVICE)
    compiled = torch.compile(copy.deepcopy(fused), backend="aot_eager", fullgraph=True)
    inputs = make_module_inputs(cfg, torch.float32, device=DEVICE)
    expected = run_module(fused, inputs)
    actual = run_module(compiled, inputs)
    actual = type(actual)((k.replace("_orig_mod.", ""), v) for k, v in actual.items())
    assert_results_close(actual, expected, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_cuda_convert_keeps_device_dtype():
    model = torch.nn.Sequential(torch.nn.LSTM(3, 4, num_layers=2)).to(DEVICE).half()
    fused_rnn.convert(model)
    assert isinstance(model[0], fused_rnn.LSTM)
    assert all(p.is_cuda and p.dtype == torch.float16 for p in model.parameters())
    out, _ = model(torch.randn(5, 2, 3, device=DEVICE, dtype=torch.float16))
    assert out.is_cuda and out.dtype == torch.float16


# --------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------

def _loss(model, x, target):
    out, state = model(x)
    h = state[0] if isinstance(state, tuple) else state
    return ((out[-1] - target) ** 2).mean() + h.pow(2).mean()


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_cuda_graph_training_step(mode, path):
    """Capture forward + backward + SGD step in one CUDA graph; replaying it
    on new data matches the same steps run eagerly."""
    cfg = Cfg(mode=mode, num_layers=2, bidirectional=True, input_size=8, hidden_size=32)
    _, model = make_module_twins(cfg, torch.float32, device=DEVICE)
    eager = copy.deepcopy(model)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    data = [(torch.randn(6, 4, 8, device=DEVICE, generator=gen),
             torch.randn(4, 64, device=DEVICE, generator=gen)) for _ in range(6)]
    static_x = data[0][0].clone()
    static_t = data[0][1].clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1)

    def eager_step(x, t):
        opt_eager.zero_grad(set_to_none=True)
        loss = _loss(eager, x, t)
        loss.backward()
        opt_eager.step()
        return loss.detach()

    # warm-up on a side stream (also applied to the eager twin)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            _loss(model, static_x, static_t).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        eager_step(data[0][0], data[0][1])

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = _loss(model, static_x, static_t)
        static_loss.backward()
        opt.step()

    for x, t in data[1:]:
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        expected = eager_step(x, t)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, expected, atol=1e-5, rtol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=n)


def test_cuda_graph_inference_no_host_sync(path):
    """Forward capture under no_grad (the inference kernels), replayed."""
    cfg = Cfg(mode="LSTM", num_layers=2, input_size=8, hidden_size=64)
    _, model = make_module_twins(cfg, torch.float32, device=DEVICE)
    x = torch.randn(10, 4, 8, device=DEVICE)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, _ = model(x)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            expected, _ = model(x)
            torch.testing.assert_close(static_out, expected, atol=1e-6, rtol=1e-6)


def test_fused_rnn_check_runs_every_kernel_path(capsys):
    """`fused-rnn check` on CUDA checks the build's every kernel: each case
    (packed input included) on the persistent, stepwise and general paths,
    and the general path and the stepwise launches replayed from CUDA
    graphs; --kernel narrows it to one."""
    from fused_rnn import cli

    assert cli.main(["check", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    for kernel in ("persistent", "stepwise", "general"):
        assert f" {kernel} kernels:" in out
    assert " general kernels replayed from CUDA graphs:" in out
    assert " stepwise kernels replayed from CUDA graphs:" in out
    # persistent, stepwise, general, then each graphed twice (captured,
    # replayed); the persistent kernels also in float32
    assert out.count("ok   GRU packed") == 8 and "FAIL" not in out
    assert out.count("(float32)") == len(cli.parity_errors("cpu"))
    assert cli.main(["check", "--device", "cuda", "--kernel", "stepwise"]) == 0
    out = capsys.readouterr().out
    assert "kernels:" not in out and out.count("ok   LSTM packed") == 1
    # the preflight's: the persistent kernels in float64 and in float32
    assert cli.main(["check", "--device", "cuda", "--kernel", "persistent"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok   LSTM packed") == 2 and "FAIL" not in out
