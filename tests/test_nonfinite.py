"""inf and NaN in inputs, states and weights: the same outputs and gradients
as torch.nn, NaN where it has NaN and inf where it has inf (float32 on the
CPU, whose gate math uses our own vectorised exp and tanh). A saturated
sigmoid is exactly 0 there, as torch's, so that it multiplies an inf into
NaN; a relu's backward passes the gradient where its output is NaN, as
torch's threshold_backward does."""

import pytest
import torch

from helpers import CELL_MODES, MODES, is_lstm, module_classes

T, B, I, H = 3, 2, 3, 4

CASES = ("inf_input", "neg_inf_input", "nan_input", "inf_h0", "inf_weight_ih",
         "inf_weight_hh", "inf_weight_hr")


def _twins(mode, seed):
    torch_cls, fused_cls, extra = module_classes(mode)
    kw = dict(extra)
    if mode == "LSTM_PROJ":
        kw["proj_size"] = 2
    torch.manual_seed(seed)
    ref = torch_cls(I, H, **kw)
    fused = fused_cls(I, H, **kw)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _poison(case, x, states, module):
    """Puts an inf or NaN where the case says, in place (weights through the
    state dict the twins share)."""
    value = {"neg_inf_input": float("-inf"), "nan_input": float("nan")}.get(case, float("inf"))
    if case.endswith("_input"):
        x[1, ..., 0] = value
    elif case == "inf_h0":
        states[0][..., 1] = value
    else:
        name = case[len("inf_"):]
        weight = next(p for n, p in module.named_parameters() if n.startswith(name))
        with torch.no_grad():
            weight[0, 0] = value


def _results(module, x, states, lstm, cell):
    x = x.clone().requires_grad_()
    states = [s.clone().requires_grad_() for s in states]
    module.zero_grad()
    hx = tuple(states) if lstm else states[0]
    out = module(x, hx)
    if cell:
        outs = list(out) if lstm else [out]
    else:
        output, hidden = out
        outs = [output, *(hidden if lstm else (hidden,))]
    torch.manual_seed(7)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    results = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    results["grad_input"] = x.grad
    for i, s in enumerate(states):
        results[f"grad_state{i}"] = s.grad
    for name, p in module.named_parameters():
        results[f"grad_{name}"] = p.grad
    return results


def _compare(mode, case, seed, cell):
    lstm = is_lstm(mode)
    ref, fused = _twins(mode, seed)
    torch.manual_seed(seed + 100)
    x = torch.randn(B, I) if cell else torch.randn(T, B, I)
    P = 2 if mode == "LSTM_PROJ" else H
    lead = () if cell else (1,)
    states = [torch.randn(*lead, B, P)] + ([torch.randn(*lead, B, H)] if lstm else [])
    _poison(case, x, states, ref)  # (a cell: its batch's second row)
    fused.load_state_dict(ref.state_dict())
    expected = _results(ref, x, states, lstm, cell)
    actual = _results(fused, x, states, lstm, cell)
    assert any(not torch.isfinite(v).all() for v in expected.values()), \
        "the case should give torch.nn non-finite results"
    for name, want in expected.items():
        torch.testing.assert_close(actual[name], want, equal_nan=True, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{mode} {case} {name}: {m}")


MODULE_CASES = [(m, c) for m in MODES for c in CASES
                if c != "inf_weight_hr" or m == "LSTM_PROJ"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode,case", MODULE_CASES, ids=[f"{m}-{c}" for m, c in MODULE_CASES])
def test_module_nonfinite_like_torch(mode, case, seed):
    _compare(mode, case, seed, cell=False)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES[:-1])  # (cells have no projection)
@pytest.mark.parametrize("mode", CELL_MODES)
def test_cell_nonfinite_like_torch(mode, case, seed):
    _compare(mode, case, seed, cell=True)
