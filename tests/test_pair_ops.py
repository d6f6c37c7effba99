"""The _pair ops (both directions of a bidirectional layer in one op; on CUDA
one launch of the persistent kernels where they take the pair): against the
one-direction ops run forward and in reverse (outputs, states and the
gradients of the input, the states and every parameter), gradcheck,
torch.library.opcheck of the forward and backward ops, mismatched
directions, and the bidirectional modules calling them. On the CPU the pair
runs one direction after the other; test_cuda_persistent.py runs the paired
launch, and test_persistent_emulation.py the kernels' paired source here."""

import pytest
import torch

import fused_rnn
from fused_rnn import ops
from helpers import OP_CELLS, PAIR_PER_DIRECTION, call_pair, make_op_args, upstream_like

OPS = torch.ops.fused_rnn

CELLS = OP_CELLS

VARIANTS = {
    "dense": {},
    "packed": {"lengths": (4, 3, 3, 1), "B": 4},
    "no_bias": {"bias": False},
    "no_bias_packed": {"bias": False, "lengths": (3, 1), "B": 2},
    "batch1": {"B": 1, "T": 5},
    "odd": {"T": 7, "B": 5, "I": 9, "H": 3},
}

PER_DIRECTION = PAIR_PER_DIRECTION


def two_directions(cell_key, variant, requires_grad=True, dtype=torch.float64, **kw):
    """Op arguments of the forward (seed 0) and reverse (seed 1) direction of
    one layer over the same input."""
    cell, extra = CELLS[cell_key]
    merged = {**extra, **kw, **VARIANTS[variant]}  # the variant's batch and lengths win
    if merged.get("P") and merged.get("H", 7) <= merged["P"]:
        merged["P"] = merged.get("H", 7) - 1
    a = make_op_args(cell, dtype=dtype, seed=0, requires_grad=requires_grad, **merged)
    b = make_op_args(cell, dtype=dtype, seed=1, requires_grad=requires_grad, reverse=True,
                     **merged)
    b["input"] = a["input"]
    return cell, a, b


def call_single(cell, a):
    args = [a["input"], *(a[k] for k in PER_DIRECTION[cell]), a["batch_sizes"], a["reverse"]]
    if cell == "rnn":
        return ops.rnn(*args, relu=a["relu"])
    return getattr(ops, cell)(*args)


def leaves(a, b):
    seen, out = set(), []
    for name, d in (("", a), ("_r", b)):
        for k, v in d.items():
            if isinstance(v, torch.Tensor) and v.requires_grad and id(v) not in seen:
                seen.add(id(v))
                out.append((k + name, v))
    return out


def results(outputs, a, b):
    """The outputs and the gradients of every leaf under a fixed random
    upstream gradient."""
    outputs = list(outputs)
    named = leaves(a, b)
    grads = torch.autograd.grad(outputs, [v for _, v in named], upstream_like(outputs, 3),
                                allow_unused=True)
    res = {f"out{i}": o.detach() for i, o in enumerate(outputs)}
    res.update({"grad_" + k: g for (k, _), g in zip(named, grads)})
    return res


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_pair_matches_both_directions(cell_key, variant):
    cell, a, b = two_directions(cell_key, variant)
    n = 3 if cell == "lstm" else 2
    paired = results(call_pair(cell, a, b), a, b)
    single = call_single(cell, a), call_single(cell, b)
    expected = results((*single[0][:n], *single[1][:n]), a, b)
    assert paired.keys() == expected.keys()
    for key in expected:
        assert expected[key] is not None, key
        torch.testing.assert_close(paired[key], expected[key], atol=1e-12, rtol=1e-12,
                                   msg=f"{cell_key} {variant}: {key}")


@pytest.mark.parametrize("cell_key", ["lstm", "gru", "rnn_tanh"])
def test_pair_bias_on_one_direction(cell_key):
    """Called directly with a bias in one direction only: each direction's
    gradients are its own (none for the missing bias)."""
    cell, a, b = two_directions(cell_key, "dense")
    b["b_ih"] = b["b_hh"] = None
    n = 3 if cell == "lstm" else 2
    paired = results(call_pair(cell, a, b), a, b)
    single = call_single(cell, a), call_single(cell, b)
    expected = results((*single[0][:n], *single[1][:n]), a, b)
    for key in expected:
        torch.testing.assert_close(paired[key], expected[key], atol=1e-12, rtol=1e-12, msg=key)


@pytest.mark.parametrize("variant", ["dense", "packed", "no_bias"])
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_gradcheck_pair(cell_key, variant):
    cell, a, b = two_directions(cell_key, variant, T=3, B=2, I=3, H=3,
                                **({"P": 2} if cell_key == "lstm_proj" else {}))
    named = leaves(a, b)

    def fn(*tensors):
        values = dict(zip((k for k, _ in named), tensors))
        a2 = {k: values.get(k, v) for k, v in a.items()}
        b2 = {k: values.get(k + "_r", v) for k, v in b.items()}
        b2["input"] = a2["input"]
        return call_pair(cell, a2, b2)

    assert torch.autograd.gradcheck(fn, [v for _, v in named])


def pair_op_args(cell, a, b, train):
    op = getattr(OPS, f"{cell}_forward_pair").default
    last = a["relu"] if cell == "rnn" else train
    return op, (a["input"], *(a[k] for k in PER_DIRECTION[cell]),
                *(b[k] for k in PER_DIRECTION[cell]), a["batch_sizes"], last)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("variant", ["dense", "packed", "no_bias_packed"])
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_opcheck_forward_pair(cell_key, variant, train):
    cell, a, b = two_directions(cell_key, variant, requires_grad=train, T=4, I=3, H=4)
    op, args = pair_op_args(cell, a, b, train)
    torch.library.opcheck(op, args)


def backward_pair_args(cell, a, b, input_grad):
    op, fargs = pair_op_args(cell, a, b, True)
    fwd = op(*fargs)
    half = len(fwd) // 2
    n = 3 if cell == "lstm" else 2
    g = upstream_like(list(fwd[:n]) + list(fwd[half:half + n]), seed=2)
    has_bias = a["b_ih"] is not None
    if cell == "lstm":
        saved = lambda d, f: (d["hx"], d["cx"], d["w_ih"], d["w_hh"], d["w_hr"], f[0], f[3],
                              f[4])
    elif cell == "gru":
        saved = lambda d, f: (d["hx"], d["w_ih"], d["w_hh"], f[0], f[2], f[3])
    else:
        saved = lambda d, f: (d["hx"], d["w_ih"], d["w_hh"], f[0])
    flags = (a["relu"], has_bias, input_grad) if cell == "rnn" else (has_bias, input_grad)
    return (*g[:n], *g[n:], a["input"], *saved(a, fwd[:half]), *saved(b, fwd[half:]),
            a["batch_sizes"], *flags)


@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("variant", ["dense", "packed", "no_bias"])
@pytest.mark.parametrize("cell_key", list(CELLS))
def test_opcheck_backward_pair(cell_key, variant, input_grad):
    cell, a, b = two_directions(cell_key, variant, requires_grad=False, T=4, I=3, H=4)
    op = getattr(OPS, f"{cell}_backward_pair").default
    torch.library.opcheck(op, backward_pair_args(cell, a, b, input_grad))


@pytest.mark.parametrize("cell_key", ["lstm", "gru", "rnn_tanh"])
def test_backward_pair_matches_single_backward_ops(cell_key):
    """The raw backward pair op: each direction's gradients those of the
    one-direction backward op, grad_input their sum."""
    cell, a, b = two_directions(cell_key, "packed", requires_grad=False)
    op = getattr(OPS, f"{cell}_backward_pair")
    args = backward_pair_args(cell, a, b, True)
    got = op(*args)
    n = 3 if cell == "lstm" else 2
    single = getattr(OPS, f"{cell}_backward")
    pair_fwd, fargs = pair_op_args(cell, a, b, True)
    fwd = pair_fwd(*fargs)
    half = len(fwd) // 2
    grads = args[:2 * n]
    rest = args[2 * n + 1:]
    n_saved = (len(rest) - (3 if cell == "rnn" else 2) - 1) // 2
    flags = args[-3:] if cell == "rnn" else args[-2:]
    expected = []
    for d, reverse in ((0, False), (1, True)):
        saved = rest[d * n_saved:(d + 1) * n_saved]
        if cell == "lstm":
            hx, cx, w_ih, w_hh, w_hr, out, gates, cells = saved
            expected.append(single(*grads[d * n:(d + 1) * n], a["input"], hx, cx, w_ih, w_hh,
                                   w_hr, out, gates, cells, a["batch_sizes"], reverse, *flags))
        elif cell == "gru":
            hx, w_ih, w_hh, out, gates, hn = saved
            expected.append(single(*grads[d * n:(d + 1) * n], a["input"], hx, w_ih, w_hh, out,
                                   gates, hn, a["batch_sizes"], reverse, *flags))
        else:
            hx, w_ih, w_hh, out = saved
            expected.append(single(*grads[d * n:(d + 1) * n], a["input"], hx, w_ih, w_hh, out,
                                   a["batch_sizes"], reverse, *flags))
    assert half == len(fwd) // 2
    torch.testing.assert_close(got[0], expected[0][0] + expected[1][0], atol=1e-12, rtol=1e-12)
    width = len(expected[0]) - 1
    for i in range(width):
        torch.testing.assert_close(got[1 + i], expected[0][1 + i], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got[1 + width + i], expected[1][1 + i], atol=1e-12,
                                   rtol=1e-12)


@pytest.mark.parametrize("cell_key", ["lstm", "gru", "rnn_tanh"])
def test_pair_mismatched_directions_raise(cell_key):
    """A reverse direction whose hidden state does not fit its weights gets
    the one-direction op's error (RuntimeError), not a crash."""
    cell, a, b = two_directions(cell_key, "dense", requires_grad=False)
    b["hx"] = b["hx"][:, :-1]
    with pytest.raises(RuntimeError):
        call_pair(cell, a, b)


@pytest.mark.parametrize("cls", [fused_rnn.LSTM, fused_rnn.GRU, fused_rnn.RNN])
def test_bidirectional_modules_run_the_pair_ops(cls, monkeypatch):
    """A bidirectional module runs each layer's two directions through one
    pair op (a unidirectional one never does)."""
    name = {fused_rnn.LSTM: "lstm", fused_rnn.GRU: "gru", fused_rnn.RNN: "rnn"}[cls]
    calls = []
    real = getattr(ops, f"{name}_pair")

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, f"{name}_pair", counting)
    x = torch.randn(5, 2, 4)
    cls(4, 3, num_layers=2, bidirectional=True)(x)
    assert len(calls) == 2
    cls(4, 3, num_layers=2)(x)
    assert len(calls) == 2
