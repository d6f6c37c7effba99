"""Parity of the cells (LSTMCell, GRUCell, RNNCell tanh / relu) with torch.nn:
new states and the gradients of the input, the states and every parameter,
batched and unbatched (1-D), state given or omitted, with and without bias."""

import pytest
import torch

from helpers import (
    CELL_MODES,
    assert_results_close,
    check_cell_parity,
    make_cell_inputs,
    make_cell_twins,
    run_cell,
)

# (input_size, hidden_size, batch, bias, unbatched, hx)
CELL_CASES = {
    "base": (7, 17, 3, True, False, True),
    "no_hx": (7, 17, 3, True, False, False),
    "no_bias": (5, 3, 4, False, False, True),
    "batch1": (3, 7, 1, True, False, True),
    "size1": (1, 1, 1, True, False, True),
    "odd": (17, 7, 5, True, False, True),
    "unbatched": (7, 5, None, True, True, True),
    "unbatched_no_hx": (3, 7, None, True, True, False),
    "unbatched_no_bias": (1, 3, None, False, True, True),
}


def _check(mode, case, dtype):
    I, H, B, bias, unbatched, hx = CELL_CASES[case]
    check_cell_parity(mode, I, H, B or 1, bias=bias, unbatched=unbatched, hx=hx, dtype=dtype)


@pytest.mark.parametrize("case", list(CELL_CASES))
@pytest.mark.parametrize("mode", CELL_MODES)
def test_cell_parity_float64(mode, case):
    _check(mode, case, torch.float64)


@pytest.mark.parametrize("case", ["base", "no_bias", "unbatched", "size1"])
@pytest.mark.parametrize("mode", CELL_MODES)
def test_cell_parity_float32(mode, case):
    _check(mode, case, torch.float32)


@pytest.mark.parametrize("case", ["odd", "unbatched_no_hx"])
@pytest.mark.parametrize("mode", CELL_MODES)
def test_cell_parity_bfloat16(mode, case):
    _check(mode, case, torch.bfloat16)


@pytest.mark.parametrize("mode", CELL_MODES)
def test_cell_unrolled_sequence(mode):
    """A cell stepped over a sequence (the state fed back each step):
    gradients through the whole recurrence match torch.nn."""
    ref, fused = make_cell_twins(mode, 5, 7, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    upstream = torch.randn(6, 3, 7, generator=g, dtype=torch.float64)
    res = {}
    for name, cell in (("torch", ref), ("fused", fused)):
        x = xs.clone().requires_grad_()
        state = None
        outs = []
        for t in range(xs.shape[0]):
            state = cell(x[t]) if state is None else cell(x[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        loss = (torch.stack(outs) * upstream).sum()
        if isinstance(state, tuple):
            loss = loss + state[1].sum()
        loss.backward()
        r = {"h": torch.stack(outs).detach(), "grad_input": x.grad}
        r.update({"grad_" + n: p.grad for n, p in cell.named_parameters()})
        res[name] = r
    assert_results_close(res["fused"], res["torch"], what=f"{mode} unrolled")


@pytest.mark.parametrize("mode", CELL_MODES)
def test_cell_no_grad(mode):
    ref, fused = make_cell_twins(mode, 4, 6, dtype=torch.float64)
    inputs = make_cell_inputs(mode, 4, 6, 3)
    with torch.no_grad():
        expected = run_cell(ref, inputs, backward=False)
        actual = run_cell(fused, inputs, backward=False)
    assert_results_close(actual, expected, what=f"{mode} no_grad")
