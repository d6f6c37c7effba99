"""Gradients of gradients (create_graph=True: gradient penalties, Hessian-
vector products, meta-learning). torch.nn's CPU RNNs are composite torch ops,
differentiable to any order; the fused ops' C++ backward is first order, so a
backward that must itself be differentiable runs through fused_rnn.reference
(fused_rnn.ops._reference_grads). Before, such a backward returned zero
second-order gradients with no more than a warning."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import reference
from helpers import (OP_CELLS, PAIR_PER_DIRECTION, call_pair, call_wrapper, initial_states,
                     make_cell_twins, make_op_args)

MODULES = {
    "LSTM": (fused_rnn.LSTM, torch.nn.LSTM, {}),
    "LSTM_proj": (fused_rnn.LSTM, torch.nn.LSTM, {"proj_size": 2}),
    "GRU": (fused_rnn.GRU, torch.nn.GRU, {}),
    "RNN_tanh": (fused_rnn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_relu": (fused_rnn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}
CONFIGS = {
    "one_layer": {},
    "two_layers_bidirectional": {"num_layers": 2, "bidirectional": True},
    "no_bias_reverse_half": {"bias": False, "bidirectional": True},
    "packed_bidirectional": {"bidirectional": True, "packed": True},
}


def penalty_grads(module, x, lengths=None):
    """The gradients, with respect to the input, the initial states and every
    parameter, of a gradient penalty: the squared norm of d(loss)/d(input,
    initial states, parameters), loss = sum(output^2) + sum of the final
    states (h_n, and c_n for an LSTM)."""
    xi = x.clone().requires_grad_()
    states = [s.requires_grad_() for s in initial_states(module, x.shape[1], x.device)]
    wrt = [xi, *states, *module.parameters()]
    inp = pack_padded_sequence(xi, lengths, enforce_sorted=False) if lengths else xi
    out, final = module(inp, tuple(states) if len(states) == 2 else states[0])
    if lengths:
        out = out.data
    finals = final if isinstance(final, tuple) else (final,)
    loss = out.pow(2).sum() + sum(f.sum() for f in finals)
    first = torch.autograd.grad(loss, wrt, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    return torch.autograd.grad(penalty, wrt)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(MODULES))
def test_gradient_penalty_matches_torch(name, config):
    fused_cls, torch_cls, kw = MODULES[name]
    kw = dict(kw)
    packed = CONFIGS[config].get("packed", False)
    kw.update({k: v for k, v in CONFIGS[config].items() if k != "packed"})
    torch.manual_seed(0)
    ours = fused_cls(3, 4, dtype=torch.float64, **kw)
    theirs = torch_cls(3, 4, dtype=torch.float64, **kw)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    lengths = [5, 2, 4] if packed else None
    expected = penalty_grads(theirs, x, lengths)
    got = penalty_grads(ours, x, lengths)
    assert any(e.abs().max() > 1e-3 for e in expected)  # a penalty that has gradients
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell", "RNNCell_TANH"])
def test_cell_gradient_penalty_matches_torch(mode):
    theirs, ours = make_cell_twins(mode, 3, 4)
    x = torch.randn(2, 3, dtype=torch.float64)
    results = []
    for m in (theirs, ours):
        xi = x.clone().requires_grad_()
        out = m(xi)
        h = out[0] if isinstance(out, tuple) else out
        first = torch.autograd.grad(h.pow(2).sum(), [xi, *m.parameters()], create_graph=True)
        results.append(torch.autograd.grad(sum(g.pow(2).sum() for g in first),
                                           [xi, *m.parameters()]))
    for g, e in zip(results[1], results[0]):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


GRADGRAD_VARIANTS = {
    "dense": {},
    "packed_reverse": {"lengths": (3, 3, 1), "B": 3, "reverse": True},
    "no_bias_packed": {"bias": False, "lengths": (2, 1), "B": 2},
}


@pytest.mark.parametrize("variant", list(GRADGRAD_VARIANTS))
@pytest.mark.parametrize("cell_key", list(OP_CELLS))
def test_gradgradcheck_ops(cell_key, variant):
    """torch.autograd.gradgradcheck of each op in float64 (second derivatives
    by finite differences of the first)."""
    cell, extra = OP_CELLS[cell_key]
    kw = dict(T=3, B=2, I=2, H=3, **extra)
    if kw.get("P"):
        kw["P"] = 2
    kw.update(GRADGRAD_VARIANTS[variant])
    args = make_op_args(cell, requires_grad=True, **kw)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*ts):
        a = dict(args)
        a.update(zip(names, ts))
        return call_wrapper(cell, a)

    assert torch.autograd.gradgradcheck(fn, [args[k] for k in names], eps=1e-6, atol=1e-6,
                                        rtol=1e-4)


@pytest.mark.parametrize("cell_key", ["lstm_proj", "gru", "rnn_tanh"])
def test_gradgradcheck_pair_ops(cell_key):
    """The same for the _pair ops (both directions of a layer in one op),
    packed."""
    cell, extra = OP_CELLS[cell_key]
    kw = dict(T=3, B=3, I=2, H=3, lengths=(3, 2, 2), **extra)
    if kw.get("P"):
        kw["P"] = 2
    a = make_op_args(cell, requires_grad=True, seed=0, **kw)
    b = make_op_args(cell, requires_grad=True, seed=1, reverse=True, **kw)
    names = [("a", "input")] + [(d, k) for d in ("a", "b") for k in PAIR_PER_DIRECTION[cell]
                                if isinstance((a if d == "a" else b)[k], torch.Tensor)]

    def fn(*ts):
        aa, bb = dict(a), dict(b)
        for (d, k), t in zip(names, ts):
            (aa if d == "a" else bb)[k] = t
        return call_pair(cell, aa, bb)

    inputs = [(a if d == "a" else b)[k] for d, k in names]
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_first_order_backward_stays_on_the_fused_op(monkeypatch):
    """Only a create_graph backward differentiates through the reference; an
    ordinary backward (training) runs the C++ backward op as before."""
    calls = []
    real = reference.lstm
    monkeypatch.setattr(reference, "lstm", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = fused_rnn.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    m(x)[0].sum().backward()
    assert calls == []
    torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("path", ["auto", "general"])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN_tanh"])
def test_gradient_penalty_on_cuda(name, path):
    """On CUDA too, against torch.nn with cuDNN disabled (cuDNN's RNNs have
    no double backward: torch.nn raises there), float64, packed, two
    bidirectional layers."""
    fused_cls, torch_cls, kw = MODULES[name]
    kw = dict(kw, num_layers=2, bidirectional=True, dtype=torch.float64, device="cuda")
    torch.manual_seed(0)
    ours = fused_cls(3, 4, **kw)
    theirs = torch_cls(3, 4, **kw)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 3, dtype=torch.float64, device="cuda")
    with torch.backends.cudnn.flags(enabled=False):
        expected = penalty_grads(theirs, x, [5, 2, 4])
    with fused_rnn.kernel_path(path):
        got = penalty_grads(ours, x, [5, 2, 4])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)
