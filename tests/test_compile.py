"""torch.compile(fullgraph=True) of every fused module (forward and
backward equal eager), dynamic shapes, a whole model, and torch.export."""

import copy

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounter

import fused_rnn
from helpers import (
    CELL_MODES,
    Cfg,
    assert_results_close,
    make_cell_inputs,
    make_cell_twins,
    make_module_inputs,
    make_module_twins,
    run_cell,
    run_module,
)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


MODULE_CASES = {
    "LSTM": Cfg(mode="LSTM", num_layers=2, bidirectional=True, input_size=3, hidden_size=5),
    "LSTM_PROJ": Cfg(mode="LSTM_PROJ", num_layers=2, batch_first=True, input_size=3,
                     hidden_size=5, hx=False),
    "GRU": Cfg(mode="GRU", num_layers=2, bidirectional=True, input_size=3, hidden_size=5),
    "RNN_TANH": Cfg(mode="RNN_TANH", input_size=3, hidden_size=5, bias=False, unbatched=True),
    "RNN_RELU": Cfg(mode="RNN_RELU", num_layers=2, input_size=3, hidden_size=5),
}

TOL = dict(atol=1e-6, rtol=1e-6)


def _compiled_copy(module, backend, **kw):
    return torch.compile(copy.deepcopy(module), backend=backend, fullgraph=True, **kw)


def _param_names_prefixed(res):
    """torch.compile wraps the module: strip the _orig_mod. prefix."""
    return type(res)((k.replace("_orig_mod.", ""), v) for k, v in res.items())


def _check_module(case, backend, dtype=torch.float32, train=False):
    cfg = MODULE_CASES[case].replace(dropout=0.3 if train else 0.0)
    _, fused = make_module_twins(cfg, dtype)
    fused.train(train)
    compiled = _compiled_copy(fused, backend)
    inputs = make_module_inputs(cfg, dtype)
    seed = 5 if train else None
    expected = run_module(fused, inputs, dropout_seed=seed)
    actual = _param_names_prefixed(run_module(compiled, inputs, dropout_seed=seed))
    assert_results_close(actual, expected, what=f"compiled[{backend}] {cfg}", **TOL)
    # a second call reuses the graph and still agrees
    actual = _param_names_prefixed(run_module(compiled, inputs, dropout_seed=seed))
    assert_results_close(actual, expected, what=f"compiled[{backend}] 2nd call {cfg}", **TOL)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_compile_module(case, backend):
    _check_module(case, backend)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("mode", CELL_MODES)
def test_compile_cell(mode, backend):
    _, fused = make_cell_twins(mode, 3, 5, dtype=torch.float32)
    compiled = _compiled_copy(fused, backend)
    inputs = make_cell_inputs(mode, 3, 5, 2, dtype=torch.float32)
    expected = run_cell(fused, inputs)
    actual = _param_names_prefixed(run_cell(compiled, inputs))
    assert_results_close(actual, expected, what=f"compiled[{backend}] {mode}", **TOL)


@pytest.mark.parametrize("case", ["LSTM", "GRU"])
def test_compile_dropout_training_eager_backend(case):
    """Dropout in training under compile (backend eager runs the same
    random ops in the same order): equal to eager with the same seed."""
    _check_module(case, "eager", train=True)


def test_compile_inductor_lstm():
    _check_module("LSTM", "inductor")


def test_compile_dynamic_shapes():
    cfg = MODULE_CASES["GRU"]
    _, fused = make_module_twins(cfg, torch.float32)
    compiled = _compiled_copy(fused, "aot_eager", dynamic=True)
    for T, B in ((5, 3), (2, 4), (7, 1)):
        c = cfg.replace(seq_len=T, batch=B)
        inputs = make_module_inputs(c, torch.float32)
        expected = run_module(fused, inputs)
        actual = _param_names_prefixed(run_module(compiled, inputs))
        assert_results_close(actual, expected, what=f"dynamic T={T} B={B}", **TOL)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.lstm = fused_rnn.LSTM(4, 5, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = fused_rnn.GRU(10, 6, batch_first=True)
        self.cell = fused_rnn.LSTMCell(6, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y, _ = self.lstm(torch.relu(self.embed(x)))
        y, h = self.gru(y)
        hc = self.cell(y[:, -1])
        return self.head(hc[0])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_whole_model(backend):
    torch.manual_seed(0)
    model = Model()
    compiled = _compiled_copy(model, backend)
    x = torch.randn(2, 6, 3)
    res = []
    for m in (model, compiled):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.pow(2).sum().backward()
        r = {"out": out.detach(), "grad_x": xi.grad}
        r.update({"grad_" + n.replace("_orig_mod.", ""): p.grad for n, p in m.named_parameters()})
        res.append(r)
    assert_results_close(res[1], res[0], what=f"whole model [{backend}]", **TOL)


def test_compile_no_graph_break_counts():
    """fullgraph already fails on a break; also check that one graph serves
    repeated calls (no recompilation per call)."""
    cfg = MODULE_CASES["LSTM"]
    _, fused = make_module_twins(cfg, torch.float32)
    counter = CompileCounter()
    compiled = torch.compile(fused, backend=counter, fullgraph=True)
    inputs = make_module_inputs(cfg, torch.float32)
    for _ in range(3):
        compiled(inputs["x"], inputs["hx"])
    assert counter.frame_count == 1


def test_torch_export_lstm():
    cfg = MODULE_CASES["LSTM"]
    _, fused = make_module_twins(cfg, torch.float32)
    inputs = make_module_inputs(cfg, torch.float32)
    exported = torch.export.export(fused, (inputs["x"], inputs["hx"]))
    out, (h, c) = exported.module()(inputs["x"], inputs["hx"])
    e_out, (e_h, e_c) = fused(inputs["x"], inputs["hx"])
    for a, b in ((out, e_out), (h, e_h), (c, e_c)):
        torch.testing.assert_close(a, b, **TOL)
