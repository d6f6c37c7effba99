"""The low-level ops (one layer, one direction, whole sequence): the autograd
wrappers in fused_rnn.ops against torch's own single-layer kernels
(helpers.reference_op), gradcheck, the raw forward / backward ops (train
flag, "not computed" outputs), torch.library.opcheck on all six ops, and
RuntimeError (not a crash) on bad arguments."""

import pytest
import torch

import fused_rnn
from helpers import (
    OP_CELLS,
    gradcheck_op,
    assert_results_close,
    assert_twice_torch_error,
    call_reference,
    call_wrapper,
    is_discontinuous,
    make_op_args,
    reference_op,
    upstream_like,
)

OPS = torch.ops.fused_rnn

CELLS = OP_CELLS

VARIANTS = {
    "dense": {},
    "dense_reverse": {"reverse": True},
    "packed": {"lengths": (4, 3, 3, 1), "B": 4},
    "packed_reverse": {"lengths": (5, 4, 2, 2, 1), "B": 5, "reverse": True},
    "packed_equal_reverse": {"lengths": (3, 3), "B": 2, "reverse": True},
    "no_bias_reverse": {"bias": False, "reverse": True},
    "no_bias_packed": {"bias": False, "lengths": (3, 1), "B": 2},
    "batch1": {"B": 1, "T": 7},
    "size1": {"T": 1, "B": 1, "I": 1, "H": 2},
    "odd": {"T": 7, "B": 5, "I": 17, "H": 3},
}


def op_args(cell_key, variant=None, **kw):
    cell, extra = CELLS[cell_key]
    merged = dict(extra)
    merged.update(VARIANTS[variant] if variant else {})
    merged.update(kw)
    if merged.get("P") and merged.get("H", 7) <= merged["P"]:
        merged["P"] = merged.get("H", 7) - 1
    return cell, make_op_args(cell, **merged)


def grads_of(outputs, args, seed=7, round_dtype=None):
    """Output values and the gradients of every differentiable argument under
    a random upstream gradient."""
    outputs = [o for o in outputs if o is not None]
    leaves = [(k, v) for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    ups = upstream_like(outputs, seed, round_dtype)
    grads = torch.autograd.grad(outputs, [v for _, v in leaves], ups, allow_unused=True)
    res = {f"out{i}": o.detach() for i, o in enumerate(outputs)}
    res.update({"grad_" + k: g for (k, _), g in zip(leaves, grads)})
    return res


SCHEMAS = {
    "lstm_forward": "(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, "
    "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, bool train) "
    "-> (Tensor output, Tensor hy, Tensor cy, Tensor gates, Tensor cells)",
    "lstm_backward": "(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, Tensor input, "
    "Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor output, Tensor gates, "
    "Tensor cells, Tensor? batch_sizes, bool reverse, bool has_bias, bool input_grad) -> "
    "(Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, "
    "Tensor grad_bias, Tensor grad_w_hr)",
    "gru_forward": "(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
    "Tensor? b_hh, Tensor? batch_sizes, bool reverse, bool train) -> (Tensor output, Tensor hy, "
    "Tensor gates, Tensor hidden_n)",
    "gru_backward": "(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, "
    "Tensor w_hh, Tensor output, Tensor gates, Tensor hidden_n, Tensor? batch_sizes, "
    "bool reverse, bool has_bias, bool input_grad) -> (Tensor grad_input, Tensor grad_hx, "
    "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)",
    "rnn_forward": "(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
    "Tensor? b_hh, Tensor? batch_sizes, bool reverse, bool relu) -> (Tensor output, Tensor hy)",
    "rnn_backward": "(Tensor grad_output, Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, "
    "Tensor w_hh, Tensor output, Tensor? batch_sizes, bool reverse, bool relu, bool has_bias, "
    "bool input_grad) -> (Tensor grad_input, Tensor grad_hx, Tensor grad_w_ih, "
    "Tensor grad_w_hh, Tensor grad_bias)",
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_op_schema(name):
    """The registered schemas are the documented ones (no mutation, no
    aliasing annotations)."""
    expected = torch._C.parse_schema(f"fused_rnn::{name}{SCHEMAS[name]}")
    assert str(getattr(OPS, name).default._schema) == str(expected)


def test_python_api():
    for name in ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "ops"):
        assert hasattr(fused_rnn, name), name
    for name in ("lstm", "gru", "rnn", "lstm_pair", "gru_pair", "rnn_pair"):
        assert callable(getattr(fused_rnn.ops, name)), name
    assert set(fused_rnn.ops.__all__) == {"lstm", "gru", "rnn", "lstm_pair", "gru_pair",
                                          "rnn_pair"}


def test_reference_reverse_is_time_flip():
    """Self-check of the test reference: on dense input the reverse direction
    is the forward direction over the time-flipped sequence."""
    _, a = op_args("lstm_proj", "dense")
    out_r, hy_r, cy_r = call_reference("lstm", dict(a, reverse=True))
    out_f, hy_f, cy_f = reference_op("lstm", a["input"].flip(0), a["hx"], a["cx"], a["w_ih"],
                                     a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"], None, False)
    torch.testing.assert_close(out_r, out_f.flip(0))
    torch.testing.assert_close(hy_r, hy_f)
    torch.testing.assert_close(cy_r, cy_f)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_wrapper_matches_reference_float64(cell_key, variant):
    cell, args = op_args(cell_key, variant, requires_grad=True)
    actual = grads_of(call_wrapper(cell, args), args)
    expected = grads_of(call_reference(cell, args), args)
    assert_results_close(actual, expected, what=f"ops.{cell} {cell_key} {variant}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_wrapper_matches_reference_lowp(cell_key, dtype):
    """Twice torch's error against torch's kernel in float64."""
    _, args64 = op_args(cell_key, "packed_reverse")
    args_low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in args64.items()}
    args_ref = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in args_low.items()}
    cell = CELLS[cell_key][0]
    res = []
    for fn, a in ((call_wrapper, args_low), (call_reference, args_low),
                  (call_reference, args_ref)):
        a = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor)
                 and v.is_floating_point() else v) for k, v in a.items()}
        res.append(grads_of(fn(cell, a), a, round_dtype=dtype))
    assert_twice_torch_error(res[0], res[1], res[2], what=f"ops.{cell} {cell_key} {dtype}",
                             discontinuous=is_discontinuous(cell_key, dtype))


@pytest.mark.parametrize("cell_key", list(CELLS))
def test_wrapper_input_without_grad(cell_key):
    """Only the weights require grad (the input_grad=False path)."""
    cell, args = op_args(cell_key, "packed_reverse", requires_grad=True)
    args["input"].requires_grad_(False)
    args["hx"].requires_grad_(False)
    actual = grads_of(call_wrapper(cell, args), args)
    expected = grads_of(call_reference(cell, args), args)
    assert "grad_input" not in actual
    assert_results_close(actual, expected, what=f"ops.{cell} weights only")


@pytest.mark.parametrize("cell_key", list(CELLS))
def test_wrapper_no_grad(cell_key):
    cell, args = op_args(cell_key, "packed", requires_grad=True)
    with torch.no_grad():
        outs = call_wrapper(cell, args)
    assert all(o.grad_fn is None for o in outs)
    expected = call_reference(cell, args)
    for o, e in zip(outs, expected):
        torch.testing.assert_close(o, e.detach(), atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------
# gradcheck (float64, small shapes)
# --------------------------------------------------------------------------

GRADCHECK_VARIANTS = {
    "dense": {},
    "reverse": {"reverse": True},
    "packed": {"lengths": (3, 2, 1), "B": 3},
    "packed_reverse": {"lengths": (3, 3, 1), "B": 3, "reverse": True},
    "no_bias": {"bias": False},
    "no_bias_packed_reverse": {"bias": False, "lengths": (2, 1), "B": 2, "reverse": True},
}


@pytest.mark.parametrize("variant", list(GRADCHECK_VARIANTS))
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_gradcheck_ops(cell_key, variant):
    cell, extra = CELLS[cell_key]
    kw = dict(T=3, B=2, I=3, H=3)
    kw.update(extra)
    if kw.get("P"):
        kw["P"] = 2
    kw.update(GRADCHECK_VARIANTS[variant])
    args = make_op_args(cell, requires_grad=True, **kw)
    assert gradcheck_op(cell, args)


# --------------------------------------------------------------------------
# The raw ops
# --------------------------------------------------------------------------

def raw_forward(cell, args, train):
    a = dict(args)
    if cell == "lstm":
        return OPS.lstm_forward(a["input"], a["hx"], a["cx"], a["w_ih"], a["w_hh"], a["b_ih"],
                                a["b_hh"], a["w_hr"], a["batch_sizes"], a["reverse"], train)
    if cell == "gru":
        return OPS.gru_forward(a["input"], a["hx"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                               a["batch_sizes"], a["reverse"], train)
    return OPS.rnn_forward(a["input"], a["hx"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                           a["batch_sizes"], a["reverse"], a["relu"])


def backward_args(cell, args, fwd, grads, input_grad=True):
    """Positional arguments of <cell>_backward from a train=True forward."""
    a = dict(args)
    has_bias = a["b_ih"] is not None
    if cell == "lstm":
        out, hy, cy, gates, cells = fwd
        return (grads[0], grads[1], grads[2], a["input"], a["hx"], a["cx"], a["w_ih"], a["w_hh"],
                a["w_hr"], out, gates, cells, a["batch_sizes"], a["reverse"], has_bias,
                input_grad)
    if cell == "gru":
        out, hy, gates, hidden_n = fwd
        return (grads[0], grads[1], a["input"], a["hx"], a["w_ih"], a["w_hh"], out, gates,
                hidden_n, a["batch_sizes"], a["reverse"], has_bias, input_grad)
    out, hy = fwd
    return (grads[0], grads[1], a["input"], a["hx"], a["w_ih"], a["w_hh"], out,
            a["batch_sizes"], a["reverse"], a["relu"], has_bias, input_grad)


def raw_backward(cell, bargs):
    return {"lstm": OPS.lstm_backward, "gru": OPS.gru_backward, "rnn": OPS.rnn_backward}[cell](
        *bargs)


@pytest.mark.parametrize("variant", ["dense", "packed_reverse"])
@pytest.mark.parametrize("cell_key", ["lstm", "lstm_proj", "gru"])
def test_raw_forward_train_flag(cell_key, variant):
    cell, args = op_args(cell_key, variant)
    trained = raw_forward(cell, args, True)
    inferred = raw_forward(cell, args, False)
    n_out = 3 if cell == "lstm" else 2
    for t, i in zip(trained[:n_out], inferred[:n_out]):
        torch.testing.assert_close(t, i, atol=0, rtol=0)
    for w in trained[n_out:]:
        assert w.numel() > 0, "train=True must return the workspaces"
    for w in inferred[n_out:]:
        assert w.shape == (0,), f"train=False workspaces must have shape [0], got {w.shape}"
    expected = call_reference(cell, args)
    for t, e in zip(trained[:n_out], expected):
        torch.testing.assert_close(t, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("variant", ["dense", "packed_reverse", "no_bias_packed", "size1"])
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_raw_backward_matches_reference(cell_key, variant, input_grad):
    cell, args = op_args(cell_key, variant)
    fwd = raw_forward(cell, args, True)
    n_out = 3 if cell == "lstm" else 2
    grads = upstream_like(fwd[:n_out], seed=5)
    got = raw_backward(cell, backward_args(cell, args, fwd, grads, input_grad))

    ref_args = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor)
                    and v.is_floating_point() else v) for k, v in args.items()}
    outs = call_reference(cell, ref_args)
    names = [k for k, v in ref_args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    ref = dict(zip(names, torch.autograd.grad(outs, [ref_args[k] for k in names], grads)))
    has_bias = args["b_ih"] is not None
    has_proj = cell == "lstm" and args["w_hr"] is not None
    empty = torch.empty(0, dtype=torch.float64)
    if cell == "lstm":
        names_out = ["input", "hx", "cx", "w_ih", "w_hh", "bias", "w_hr"]
        ref["bias"] = ref["b_ih"] if has_bias else empty
        if not has_proj:
            ref["w_hr"] = empty
    elif cell == "gru":
        names_out = ["input", "hx", "w_ih", "w_hh", "b_ih", "b_hh"]
        if not has_bias:
            ref["b_ih"] = ref["b_hh"] = empty
    else:
        names_out = ["input", "hx", "w_ih", "w_hh", "bias"]
        ref["bias"] = ref["b_ih"] if has_bias else empty
    if not input_grad:
        ref["input"] = empty
    if has_bias and cell != "gru":
        # b_ih and b_hh enter LSTM / RNN only through their sum
        torch.testing.assert_close(ref["b_ih"], ref["b_hh"])
    assert len(got) == len(names_out)
    actual = {"grad_" + n: g for n, g in zip(names_out, got)}
    expected = {"grad_" + n: ref[n] for n in names_out}
    assert_results_close(actual, expected, what=f"{cell}_backward {cell_key} {variant}")


# --------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------

OPCHECK_SAMPLES = {
    # name: (cell_key, variant, train)
    "dense_train": ("dense", True),
    "dense_eval": ("dense", False),
    "packed_reverse_train": ("packed_reverse", True),
    "packed_eval": ("packed", False),
    "no_bias_reverse_train": ("no_bias_reverse", True),
    "no_bias_packed_eval": ("no_bias_packed", False),
}


def small(cell_key, variant, requires_grad):
    return op_args(cell_key, variant, T=min(4, VARIANTS[variant].get("T", 4)), I=3, H=4,
                   requires_grad=requires_grad)


def forward_op_and_args(cell, args, train):
    a = dict(args)
    if cell == "lstm":
        return OPS.lstm_forward.default, (
            a["input"], a["hx"], a["cx"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"],
            a["batch_sizes"], a["reverse"], train)
    if cell == "gru":
        return OPS.gru_forward.default, (
            a["input"], a["hx"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["batch_sizes"],
            a["reverse"], train)
    return OPS.rnn_forward.default, (
        a["input"], a["hx"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["batch_sizes"],
        a["reverse"], a["relu"])


@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES))
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_opcheck_forward(cell_key, sample):
    variant, train = OPCHECK_SAMPLES[sample]  # rnn_forward has no train flag: requires_grad only
    cell, args = small(cell_key, variant, requires_grad=train)
    op, op_args_ = forward_op_and_args(cell, args, train)
    torch.library.opcheck(op, op_args_)


@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("variant", ["dense", "packed_reverse", "no_bias_reverse"])
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_opcheck_backward(cell_key, variant, input_grad):
    cell, args = small(cell_key, variant, requires_grad=False)
    fwd = raw_forward(cell, args, True)
    n_out = 3 if cell == "lstm" else 2
    grads = upstream_like(fwd[:n_out], seed=2)
    op = {"lstm": OPS.lstm_backward, "gru": OPS.gru_backward, "rnn": OPS.rnn_backward}[cell]
    torch.library.opcheck(op.default, backward_args(cell, args, fwd, grads, input_grad))


@pytest.mark.parametrize("sample", ["dense_train", "dense_eval", "packed_reverse_train",
                                    "packed_eval"])
def test_opcheck_lstm_proj_folded(monkeypatch, sample):
    """The LSTM ops with proj_size folded (FUSED_RNN_PROJECTION=fold), the
    route the CUDA kernels take: forward, and backward after a training one."""
    monkeypatch.setenv("FUSED_RNN_PROJECTION", "fold")
    test_opcheck_forward("lstm_proj", sample)
    variant, train = OPCHECK_SAMPLES[sample]
    if train:
        test_opcheck_backward("lstm_proj", variant, input_grad=True)


# --------------------------------------------------------------------------
# Bad arguments: RuntimeError, never a crash
# --------------------------------------------------------------------------

def _bad_cases(cell):
    """(name, function of the args dict that breaks them)."""
    cases = [
        ("hx_wrong_batch", lambda a: a.update(hx=a["hx"][:-1])),
        ("hx_wrong_size", lambda a: a.update(hx=torch.cat([a["hx"], a["hx"][:, :1]], 1))),
        ("w_ih_wrong_input_size",
         lambda a: a.update(w_ih=torch.cat([a["w_ih"], a["w_ih"][:, :1]], 1))),
        ("w_ih_wrong_rows", lambda a: a.update(w_ih=a["w_ih"][:-1])),
        ("w_hh_wrong_shape", lambda a: a.update(w_hh=a["w_hh"][:, :-1])),
        ("b_ih_wrong_size", lambda a: a.update(b_ih=a["b_ih"][:-1])),
        ("b_hh_wrong_size", lambda a: a.update(b_hh=a["b_hh"][:-1])),
        ("input_dtype", lambda a: a.update(input=a["input"].float())),
        ("hx_dtype", lambda a: a.update(hx=a["hx"].float())),
        ("input_2d_dense", lambda a: a.update(input=a["input"][0])),
        ("input_4d", lambda a: a.update(input=a["input"].unsqueeze(0))),
        ("dense_input_with_batch_sizes",
         lambda a: a.update(batch_sizes=torch.tensor([3, 3, 3, 3]))),
    ]
    if cell == "lstm":
        cases += [
            ("cx_wrong_batch", lambda a: a.update(cx=a["cx"][:-1])),
            ("cx_wrong_size", lambda a: a.update(cx=a["cx"][:, :-1])),
        ]
    return cases


def _packed_bad_cases():
    return [
        ("batch_sizes_sum", lambda a: a.update(batch_sizes=torch.tensor([4, 3, 2]))),
        ("batch_sizes_increasing", lambda a: a.update(batch_sizes=torch.tensor([1, 3, 3, 4]))),
        ("batch_sizes_first_not_B", lambda a: a.update(batch_sizes=torch.tensor([3, 3, 3, 2]))),
        ("batch_sizes_zero_step", lambda a: a.update(batch_sizes=torch.tensor([4, 3, 4, 0]))),
        ("batch_sizes_negative", lambda a: a.update(batch_sizes=torch.tensor([4, 4, 5, -2]))),
        ("batch_sizes_2d", lambda a: a.update(batch_sizes=torch.tensor([[4, 3], [3, 1]]))),
        ("batch_sizes_float", lambda a: a.update(batch_sizes=torch.tensor([4.0, 3.0, 3.0, 1.0]))),
    ]


def _all_bad(cell_key):
    cell = CELLS[cell_key][0]
    out = [(cell_key, "dense", n) for n, _ in _bad_cases(cell)]
    out += [(cell_key, "packed", n) for n, _ in _packed_bad_cases()]
    if cell_key == "lstm_proj":
        out += [(cell_key, "dense", "w_hr_wrong_shape")]
    return out


BAD = [c for k in CELLS for c in _all_bad(k)]


@pytest.mark.parametrize("cell_key,variant,case", BAD, ids=["-".join(c) for c in BAD])
def test_raw_forward_bad_args_raise(cell_key, variant, case):
    cell, args = op_args(cell_key, variant)  # packed: lengths (4, 3, 3, 1), 11 rows
    cases = dict(_bad_cases(cell) + _packed_bad_cases())
    cases["w_hr_wrong_shape"] = lambda a: a.update(w_hr=a["w_hr"][:, :-1])
    args = dict(args)
    cases[case](args)
    with pytest.raises(RuntimeError):
        raw_forward(cell, args, True)


@pytest.mark.parametrize("case", ["grad_output_shape", "grad_hy_shape", "output_shape",
                                  "workspace_shape"])
@pytest.mark.parametrize("cell_key", ["lstm", "gru", "rnn_tanh"])
def test_raw_backward_bad_args_raise(cell_key, case):
    cell, args = op_args(cell_key, "dense")
    fwd = list(raw_forward(cell, args, True))
    n_out = 3 if cell == "lstm" else 2
    grads = upstream_like(fwd[:n_out], seed=2)
    if case == "grad_output_shape":
        grads[0] = grads[0][:-1]
    elif case == "grad_hy_shape":
        grads[1] = grads[1][:, :-1]
    elif case == "output_shape":
        fwd[0] = fwd[0][:-1]
    elif case == "workspace_shape":
        if cell == "rnn":
            fwd[0] = fwd[0][:, :, :-1]  # rnn keeps no workspace: a wrong output width instead
        else:
            # the empty workspace of a train=False forward
            fwd[2 if cell == "gru" else 3] = torch.empty(0, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        raw_backward(cell, backward_args(cell, args, fwd, grads))
