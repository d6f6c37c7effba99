"""torch.func transforms (grad, jvp, hessian, vmap) and forward-mode AD
through the fused modules. The fused ops have no batching or forward-
derivative rule, so under a transform (or with a forward-AD tangent) the
entry points of fused_rnn.ops run fused_rnn.reference, plain torch ops: the
results match torch.nn's composite CPU RNNs. Before, torch.func.jvp saw a
zero tangent with no error, and grad / hessian raised."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jvp, stack_module_state, vmap
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import ops, reference
from helpers import initial_states, make_cell_twins

MODULES = {
    "LSTM": (fused_rnn.LSTM, torch.nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    "LSTM_proj": (fused_rnn.LSTM, torch.nn.LSTM, {"proj_size": 2}),
    "GRU": (fused_rnn.GRU, torch.nn.GRU, {"num_layers": 2, "bidirectional": True}),
    "RNN_tanh": (fused_rnn.RNN, torch.nn.RNN, {"bidirectional": True}),
    "RNN_relu": (fused_rnn.RNN, torch.nn.RNN, {"nonlinearity": "relu", "num_layers": 2}),
}


def twins(name, **extra):
    fused_cls, torch_cls, kw = MODULES[name]
    torch.manual_seed(0)
    ours = fused_cls(3, 4, dtype=torch.float64, **kw, **extra)
    theirs = torch_cls(3, 4, dtype=torch.float64, **kw, **extra)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def output(module):
    return lambda x: module(x)[0]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(MODULES))
def test_jvp_matches_torch(name, compiled):
    """Tangents of the output and the final states, from tangents of the
    input and the initial states, against torch.nn's eager jvp. Compiled:
    the jvp traced by torch.compile, whose graph calls the fused ops (the
    entry points cannot see the transform there), so that their Autograd
    kernel computes the tangents (before, they came out zero, silently)."""
    ours, theirs = twins(name)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    states = initial_states(ours, 2)
    primals = (x, *states)
    tangents = tuple(torch.randn_like(p) for p in primals)

    def everything(module):
        def f(xx, *hx):
            out, final = module(xx, tuple(hx) if len(hx) == 2 else hx[0])
            return (out, *(final if isinstance(final, tuple) else (final,)))
        return lambda: jvp(f, primals, tangents)

    run = everything(ours)
    if compiled:
        torch._dynamo.reset()
        run = torch.compile(run, backend="aot_eager", fullgraph=True)
    (ours_out, ours_tan), (out_t, tan_t) = run(), everything(theirs)()
    assert all(t.abs().max() > 1e-3 for t in tan_t)
    for a, b in zip(ours_out + ours_tan, out_t + tan_t):
        close(a, b)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name", list(MODULES))
def test_forward_ad_matches_torch(name, packed):
    ours, theirs = twins(name)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    if packed:  # (pack_padded_sequence itself has no forward derivative)
        x, v = (pack_padded_sequence(t, [5, 2, 4], enforce_sorted=False) for t in (x, v))
    tangents = []
    for m in (ours, theirs):
        with fwAD.dual_level():
            inp = (x._replace(data=fwAD.make_dual(x.data, v.data)) if packed
                   else fwAD.make_dual(x, v))
            out = m(inp)[0]
            tangents.append(fwAD.unpack_dual(out.data if packed else out).tangent)
    close(*tangents)


@pytest.mark.parametrize("name", list(MODULES))
def test_func_grad_of_parameters_matches_torch(name):
    ours, theirs = twins(name)
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def loss(module):
        return lambda params: functional_call(module, params, (x,))[0].pow(2).sum()

    grads = [grad(loss(m))({k: v.detach() for k, v in m.named_parameters()})
             for m in (ours, theirs)]
    for k in grads[1]:
        close(grads[0][k], grads[1][k])


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN_tanh"])
def test_hessian_matches_torch(name):
    ours, theirs = twins(name)
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    close(*(hessian(lambda xx, m=m: m(xx)[0].pow(2).sum())(x) for m in (ours, theirs)))


@pytest.mark.parametrize("name", list(MODULES))
def test_vmap_over_inputs(name):
    """vmap over a batch of inputs (torch.nn's RNNs have no batching rule):
    the same as one call per input."""
    ours, _ = twins(name)
    xs = torch.randn(3, 5, 2, 3, dtype=torch.float64)
    mapped = vmap(output(ours))(xs)
    for i in range(3):
        close(mapped[i], ours(xs[i])[0])


def test_vmap_ensemble_of_weights():
    """Model ensembling: vmap over stacked parameters of several modules
    (torch.func.stack_module_state), one input."""
    torch.manual_seed(0)
    models = [fused_rnn.GRU(3, 4, dtype=torch.float64) for _ in range(3)]
    params, buffers = stack_module_state(models)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    mapped = vmap(lambda p, b: functional_call(models[0], (p, b), (x,))[0])(params, buffers)
    for i, m in enumerate(models):
        close(mapped[i], m(x)[0])


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell", "RNNCell_TANH"])
def test_cell_jvp_matches_torch(mode):
    theirs, ours = make_cell_twins(mode, 3, 4)
    x = torch.randn(2, 3, dtype=torch.float64)
    v = torch.randn_like(x)

    def first(m):
        return lambda xx: (lambda out: out[0] if isinstance(out, tuple) else out)(m(xx))

    close(*(jvp(first(m), (x,), (v,))[1] for m in (ours, theirs)))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_jacfwd_and_forward_ad_inside_compile(backend):
    """torch.func.jacfwd and torch.autograd.forward_ad under torch.compile
    (before: wrong Jacobian; NotImplementedError)."""
    ours, theirs = twins("GRU")
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    v = torch.randn_like(x)

    def jacobian(module):
        return lambda xx: torch.func.jacfwd(lambda y: module(y)[1].sum(0))(xx)

    def forward_ad(module):
        def f(xx):
            with fwAD.dual_level():
                return fwAD.unpack_dual(module(fwAD.make_dual(xx, v))[0]).tangent
        return f

    for fn in (jacobian, forward_ad):
        torch._dynamo.reset()
        close(torch.compile(fn(ours), backend=backend)(x), fn(theirs)(x))


@pytest.mark.parametrize("op", ["lstm_forward", "gru_forward", "rnn_forward",
                                "lstm_forward_pair", "gru_forward_pair", "rnn_forward_pair"])
def test_ops_carry_tangents(op):
    """The ops themselves, called directly under forward AD: the tangents of
    their differentiable outputs match fused_rnn.reference's; the training
    workspace has the fake kernel's shape."""
    torch.manual_seed(0)
    T, B, I, H = 4, 2, 3, 5
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[op.split("_")[0]]
    lstm = op.startswith("lstm")

    def direction():
        states = [torch.randn(B, H, dtype=torch.float64) for _ in range(2 if lstm else 1)]
        weights = [torch.randn(gates * H, I, dtype=torch.float64),
                   torch.randn(gates * H, H, dtype=torch.float64),
                   torch.randn(gates * H, dtype=torch.float64),
                   torch.randn(gates * H, dtype=torch.float64)]
        return states + weights + ([None] if lstm else [])

    x = torch.randn(T, B, I, dtype=torch.float64)
    args = [x, *direction()]
    if op.endswith("pair"):
        args += direction()
        flags = [None, lstm or op.startswith("gru")]  # batch_sizes; train (or relu)
    else:
        flags = [None, True, lstm or op.startswith("gru")]  # batch_sizes, reverse; train/relu
    tangents = [torch.randn_like(a) if isinstance(a, torch.Tensor) else None for a in args]
    call = getattr(torch.ops.fused_rnn, op)
    with fwAD.dual_level():
        duals = [a if t is None else fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
        returns = [fwAD.unpack_dual(r) for r in call(*duals, *flags)]
    assert [r.primal.shape for r in returns] == [r.shape for r in call(*args, *flags)]

    tensors = [i for i, a in enumerate(args) if a is not None]

    def run(*values):
        full = list(args)
        for i, value in zip(tensors, values):
            full[i] = value
        return getattr(ops, f"_{op.replace('_forward', '')}_reference")(*full, *flags)

    expected_out, expected = jvp(run, tuple(args[i] for i in tensors),
                                 tuple(tangents[i] for i in tensors))
    got = [r for r in returns if r.tangent is not None]
    assert len(got) == len(expected)
    for r, out, tangent in zip(got, expected_out, expected):
        close(r.primal, out)
        close(r.tangent, tangent)


def test_plain_calls_stay_on_the_fused_ops(monkeypatch):
    """Outside a transform (inference, training, torch.compile) the fused
    ops run, not the reference."""
    calls = []
    real = reference.gru
    monkeypatch.setattr(reference, "gru", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = fused_rnn.GRU(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        m(x)
    m(x)[0].sum().backward()
    with fwAD.dual_level():  # a dual level open, but no tangent on the inputs
        m(x)
    assert calls == []
    jvp(output(m), (x.detach(),), (torch.ones_like(x),))
    assert calls == [1]
