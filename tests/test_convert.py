"""fused_rnn.convert: torch.nn RNN modules inside a model swapped for their
fused twins (recursively, in place) and back, with the same weights, device,
dtype and training flag; outputs and gradients unchanged."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import fused_rnn
from helpers import MODES, CELL_MODES, assert_results_close, module_classes

TORCH_TYPES = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
FUSED_TYPES = (fused_rnn.LSTM, fused_rnn.GRU, fused_rnn.RNN, fused_rnn.LSTMCell,
               fused_rnn.GRUCell, fused_rnn.RNNCell)
PAIRS = dict(zip(TORCH_TYPES, FUSED_TYPES))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(8, 4, num_layers=2, nonlinearity="relu", bias=False)
        self.cells = nn.ModuleList([nn.GRUCell(4, 4), nn.RNNCell(4, 4, nonlinearity="tanh")])

    def forward(self, x):
        y, h = self.rnn(x)
        state = h[-1]
        for t in range(y.shape[0]):
            state = self.cells[0](y[t], state)
            state = self.cells[1](y[t], state)
        return y, state


class Net(nn.Module):
    """Every kind of torch.nn RNN module, nested at several depths."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True,
                            dropout=0.3)
        self.blocks = nn.ModuleDict({
            "gru": nn.GRU(10, 4, bidirectional=True),
            "proj": nn.LSTM(8, 6, proj_size=2),
        })
        self.inner = nn.Sequential(Inner())
        self.lstm_cell = nn.LSTMCell(4, 3)
        self.head = nn.Linear(3 + 4, 2)

    def forward(self, x):  # x (B, T, 3)
        y, _ = self.lstm(self.embed(x))           # (B, T, 10)
        y, _ = self.blocks["gru"](y.transpose(0, 1))  # (T, B, 8)
        p, (hp, _) = self.blocks["proj"](y)       # (T, B, 2)
        z, state = self.inner[0](y)               # (T, B, 4), (B, 4)
        h, c = self.lstm_cell(z[-1])
        return self.head(torch.cat([h, state], -1)) + p[-1].sum(-1, keepdim=True)


def _rnn_modules(model, types):
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def _forward_backward(model, x):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(17)  # dropout (training)
    x = x.clone().requires_grad_()
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * g).sum().backward()
    res = {"output": out.detach(), "grad_input": x.grad}
    res.update({"grad_" + n: p.grad for n, p in model.named_parameters()})
    return res


@pytest.mark.parametrize("training", [True, False])
def test_convert_nested_model(training):
    torch.manual_seed(0)
    model = Net().double().train(training)
    model.blocks["gru"].train(not training)  # mixed flags survive
    original = copy.deepcopy(model)
    torch_modules = _rnn_modules(model, TORCH_TYPES)
    assert len(torch_modules) == 7

    converted = fused_rnn.convert(model)
    assert converted is model, "convert works in place and returns the model"
    fused_modules = _rnn_modules(converted, FUSED_TYPES)
    assert sorted(fused_modules) == sorted(torch_modules)
    for name, old in torch_modules.items():
        new = fused_modules[name]
        assert type(new) is PAIRS[type(old)], name
        assert new.training == old.training, name
        assert [n for n, _ in new.named_parameters()] == [n for n, _ in old.named_parameters()]
        for (n, p), (_, q) in zip(new.named_parameters(), old.named_parameters()):
            assert p.dtype == q.dtype and p.device == q.device
            assert torch.equal(p, q), f"{name}.{n}"
    assert not _rnn_modules(converted, TORCH_TYPES), "a torch.nn RNN module is left"
    # the other modules are untouched
    assert type(converted.embed) is nn.Linear and type(converted.inner) is nn.Sequential

    x = torch.randn(3, 5, 3, dtype=torch.float64)
    assert_results_close(_forward_backward(converted, x), _forward_backward(original, x),
                         what="converted model")

    back = fused_rnn.convert(converted, to="torch")
    assert back is converted
    back_modules = _rnn_modules(back, TORCH_TYPES + FUSED_TYPES)
    for name, old in torch_modules.items():
        assert type(back_modules[name]) is type(old), name
        assert back_modules[name].training == old.training
    assert_results_close(_forward_backward(back, x), _forward_backward(original, x),
                         what="converted back")
    assert back.state_dict().keys() == original.state_dict().keys()
    for k, v in original.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


BARE = {
    "LSTM": dict(num_layers=2, bidirectional=True, batch_first=True, dropout=0.2, bias=False),
    "LSTM_PROJ": dict(num_layers=2, proj_size=3),
    "GRU": dict(num_layers=3, batch_first=True, bias=False),
    "RNN_TANH": dict(bidirectional=True, dropout=0.1, num_layers=2),
    "RNN_RELU": dict(num_layers=1),
    "LSTMCell": dict(bias=False),
    "GRUCell": dict(),
    "RNNCell_TANH": dict(),
    "RNNCell_RELU": dict(bias=False),
}

HYPER = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
         "bidirectional", "proj_size", "nonlinearity", "mode")


@pytest.mark.parametrize("mode", list(BARE))
def test_convert_bare_module(mode):
    torch_cls, fused_cls, extra = module_classes(mode)
    torch.manual_seed(0)
    ref = torch_cls(4, 6, dtype=torch.float64, **extra, **BARE[mode]).eval()
    fused = fused_rnn.convert(ref)
    assert type(fused) is fused_cls
    assert not fused.training
    for attr in HYPER:
        if hasattr(ref, attr):
            assert getattr(fused, attr) == getattr(ref, attr), attr
    for (n, p), (m, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert n == m and p.dtype == torch.float64 and torch.equal(p, q)
    x = torch.randn((2, 3, 4) if mode in MODES else (3, 4), dtype=torch.float64)
    out_r, _ = tree_flatten(ref(x))
    out_f, _ = tree_flatten(fused(x))
    assert len(out_f) == len(out_r)
    for a, b in zip(out_f, out_r):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    back = fused_rnn.convert(fused, to="torch")
    assert type(back) is torch_cls
    for attr in HYPER:
        if hasattr(ref, attr):
            assert getattr(back, attr) == getattr(ref, attr), attr


def test_convert_keeps_frozen_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(3, 4, num_layers=2))
    model[0].weight_ih_l0.requires_grad_(False)
    fused_rnn.convert(model)
    assert isinstance(model[0], fused_rnn.LSTM)
    assert not model[0].weight_ih_l0.requires_grad
    assert model[0].weight_hh_l0.requires_grad


def test_convert_then_train_step_updates_weights():
    """A converted model trains: an optimizer built after convert updates
    the weights the fused module uses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.GRU(3, 4, num_layers=2))
    ref = copy.deepcopy(model)
    fused_rnn.convert(model)
    x = torch.randn(5, 2, 3)
    for m in (model, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m[0](x)[0].pow(2).sum().backward()
        opt.step()
    torch.testing.assert_close(model[0](x)[0], ref[0](x)[0], atol=1e-5, rtol=1e-5)


def test_convert_model_without_rnn_is_unchanged():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    assert fused_rnn.convert(model) is model
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU]


def test_convert_invalid_target():
    with pytest.raises((ValueError, TypeError)):
        fused_rnn.convert(nn.LSTM(2, 3), to="tensorflow")


@pytest.mark.parametrize("mode", CELL_MODES)
def test_convert_cell_round_trip_outputs(mode):
    torch_cls, _, extra = module_classes(mode)
    torch.manual_seed(1)
    cell = torch_cls(3, 5, dtype=torch.float64, **extra)
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = cell(x)
    there = fused_rnn.convert(copy.deepcopy(cell))
    back = fused_rnn.convert(copy.deepcopy(there), to="torch")
    for m in (there, back):
        got = m(x)
        if isinstance(expected, tuple):
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
        else:
            torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


# ----------------------------------------- what a model did to its RNN modules
def _lstm_and_cell():
    torch.manual_seed(0)
    model = nn.Module()
    model.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True).double()
    model.cell = nn.GRUCell(4, 6).double()
    return model


def _run(model, seed=3):
    """Outputs and every gradient of the two modules of _lstm_and_cell."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    out, (h, c) = model.lstm(x)
    hc = model.cell(x[0])
    (out.pow(2).sum() + h.sum() + c.sum() + hc.pow(2).sum()).backward()
    result = {"out": out, "h": h, "c": c, "hc": hc, "grad_x": x.grad}
    result.update({n: p.grad for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return result


def _reparametrize(model, how):
    from torch.nn.utils import parametrize, prune

    for module, name in ((model.lstm, "weight_hh_l0"), (model.lstm, "weight_ih_l1_reverse"),
                         (model.cell, "weight_hh")):
        if how == "weight_norm":
            torch.nn.utils.weight_norm(module, name)
        elif how == "spectral_norm":
            torch.nn.utils.spectral_norm(module, name)
        elif how == "prune":
            prune.l1_unstructured(module, name, amount=0.3)
        elif how == "parametrize":
            parametrize.register_parametrization(module, name, _Scale())
        else:
            torch.nn.utils.parametrizations.orthogonal(module, name)


class _Scale(nn.Module):
    def forward(self, weight):
        return 0.5 * weight


@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm", "prune", "parametrize",
                                 "orthogonal"])
def test_convert_reparametrized_modules(how):
    """Modules that went through torch.nn.utils' weight_norm, spectral_norm,
    prune or parametrize (whose class parametrize replaced) convert, keep
    their reparametrization and match torch.nn, outputs and gradients of
    the underlying parameters, and convert back."""
    model = _lstm_and_cell()
    _reparametrize(model, how)
    model.eval()  # spectral_norm: no power iteration, the same weights in both runs
    expected = _run(model)
    converted = fused_rnn.convert(model)
    assert isinstance(converted.lstm, fused_rnn.LSTM), type(converted.lstm)
    assert isinstance(converted.cell, fused_rnn.GRUCell), type(converted.cell)
    actual = _run(converted)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-10, rtol=1e-10,
                                   msg=key)
    back = fused_rnn.convert(converted, to="torch")
    assert type(back.lstm).__bases__[0] is nn.LSTM or type(back.lstm) is nn.LSTM
    for key, value in _run(back).items():
        torch.testing.assert_close(value, expected[key], atol=1e-10, rtol=1e-10, msg=key)


def test_convert_keeps_hooks_buffers_attributes_and_sharing():
    """A converted module keeps the hooks registered on it (the caller's
    handles still remove them), its extra buffers (in state_dict too) and
    attributes, and a module held twice becomes one twin held twice."""
    model = _lstm_and_cell()
    model.again = model.lstm
    calls = []
    handle = model.lstm.register_forward_hook(lambda m, args, out: calls.append(type(m)))
    model.lstm.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model.lstm.register_buffer("steps", torch.tensor(7))
    model.lstm.note = "kept"
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    expected = model.lstm(x)[0]
    converted = fused_rnn.convert(model)
    assert converted.again is converted.lstm and isinstance(converted.lstm, fused_rnn.LSTM)
    torch.testing.assert_close(converted.lstm(x)[0], expected, atol=1e-10, rtol=1e-10)
    assert calls == [nn.LSTM, fused_rnn.LSTM]
    handle.remove()
    converted.lstm(x)
    assert len(calls) == 2
    assert converted.lstm.note == "kept" and int(converted.lstm.steps) == 7
    assert "lstm.steps" in converted.state_dict()


def test_convert_leaves_subclasses_alone():
    """A subclass of a torch.nn RNN (which may have a forward of its own)
    is not swapped."""
    class Custom(nn.GRU):
        pass

    model = nn.Sequential(Custom(4, 6))
    assert fused_rnn.convert(model)[0].__class__ is Custom
