"""Module properties shared with torch.nn: parameter names, shapes, dtypes and
initialisation, state_dict both ways, repr, .to() / .double(), constructor
device / dtype, base classes, batch size 0, functional_call, parameters
changed after construction."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

from helpers import (
    CELL_MODES,
    MODES,
    Cfg,
    assert_results_close,
    make_cell_inputs,
    make_cell_twins,
    make_module_inputs,
    make_module_twins,
    module_classes,
    run_cell,
    run_module,
)

CONFIGS = {
    "plain": Cfg(),
    "full": Cfg(num_layers=3, bidirectional=True, bias=False, batch_first=True, dropout=0.25),
    "bidir_l2": Cfg(num_layers=2, bidirectional=True),
}


def _pair(mode, cfg_key="full", dtype=torch.float64):
    return make_module_twins(CONFIGS[cfg_key].replace(mode=mode), dtype)


@pytest.mark.parametrize("cfg_key", list(CONFIGS))
@pytest.mark.parametrize("mode", MODES)
def test_parameters_names_shapes_and_init(mode, cfg_key):
    """Same names, shapes and dtypes; with the same seed, the same initial
    values (torch's init)."""
    cfg = CONFIGS[cfg_key].replace(mode=mode)
    torch_cls, fused_cls, _ = module_classes(mode)
    kw = cfg.ctor_kwargs()
    torch.manual_seed(123)
    ref = torch_cls(cfg.input_size, cfg.hidden_size, **kw)
    torch.manual_seed(123)
    fused = fused_cls(cfg.input_size, cfg.hidden_size, **kw)
    ref_params = [(n, p.shape, p.dtype) for n, p in ref.named_parameters()]
    fused_params = [(n, p.shape, p.dtype) for n, p in fused.named_parameters()]
    assert fused_params == ref_params
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), f"{n}: initial values differ from torch.nn's"
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert len(fused._flat_weights) == len(ref._flat_weights)
    assert [tuple(w.shape) for layer in fused.all_weights for w in layer] == \
        [tuple(w.shape) for layer in ref.all_weights for w in layer]


@pytest.mark.parametrize("mode", CELL_MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_cell_parameters_names_shapes_and_init(mode, bias):
    torch_cls, fused_cls, extra = module_classes(mode)
    torch.manual_seed(7)
    ref = torch_cls(5, 7, bias=bias, **extra)
    torch.manual_seed(7)
    fused = fused_cls(5, 7, bias=bias, **extra)
    assert [(n, p.shape, p.dtype) for n, p in fused.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in ref.named_parameters()]
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("mode", MODES)
def test_attributes_and_base_classes(mode):
    ref, fused = _pair(mode)
    assert isinstance(fused, nn.RNNBase)
    # torch.compile refuses instances of these three (see DESIGN.md)
    assert not isinstance(fused, (nn.LSTM, nn.GRU, nn.RNN))
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "dropout", "bidirectional", "proj_size", "training"):
        assert getattr(fused, attr) == getattr(ref, attr), attr
    if mode.startswith("RNN"):
        assert fused.nonlinearity == ref.nonlinearity


@pytest.mark.parametrize("mode", CELL_MODES)
def test_cell_attributes_and_base_classes(mode):
    ref, fused = make_cell_twins(mode, 3, 5)
    assert isinstance(fused, nn.RNNCellBase)
    assert not isinstance(fused, (nn.LSTMCell, nn.GRUCell, nn.RNNCell))
    for attr in ("input_size", "hidden_size", "bias"):
        assert getattr(fused, attr) == getattr(ref, attr)
    if mode.startswith("RNNCell"):
        assert fused.nonlinearity == ref.nonlinearity


@pytest.mark.parametrize("mode", MODES + CELL_MODES)
def test_repr(mode):
    torch_cls, fused_cls, extra = module_classes(mode)
    kw = dict(extra)
    if mode in MODES:
        kw.update(num_layers=2, bias=False, batch_first=True, dropout=0.5, bidirectional=True)
        if mode == "LSTM_PROJ":
            kw["proj_size"] = 3
    else:
        kw["bias"] = False
    ref = torch_cls(4, 6, **kw)
    fused = fused_cls(4, 6, **kw)
    assert fused.extra_repr() == ref.extra_repr()
    assert repr(fused) == repr(ref).replace(type(ref).__name__, type(fused).__name__, 1)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip(mode):
    ref, _ = _pair(mode, "bidir_l2")
    torch_cls, fused_cls, _ = module_classes(mode)
    cfg = CONFIGS["bidir_l2"].replace(mode=mode)
    fused = fused_cls(cfg.input_size, cfg.hidden_size, dtype=torch.float64, **cfg.ctor_kwargs())
    # torch -> fused
    fused.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v)
    inputs = make_module_inputs(cfg)
    assert_results_close(run_module(fused, inputs), run_module(ref, inputs))
    # fused -> torch (after changing the fused weights)
    with torch.no_grad():
        for p in fused.parameters():
            p.mul_(-0.5)
    back = torch_cls(cfg.input_size, cfg.hidden_size, dtype=torch.float64, **cfg.ctor_kwargs())
    back.load_state_dict(fused.state_dict(), strict=True)
    assert_results_close(run_module(fused, inputs), run_module(back, inputs))
    # serialisation
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    again = fused_cls(cfg.input_size, cfg.hidden_size, dtype=torch.float64, **cfg.ctor_kwargs())
    again.load_state_dict(torch.load(buf))
    assert_results_close(run_module(again, inputs), run_module(back, inputs))


@pytest.mark.parametrize("mode", MODES)
def test_deepcopy_and_pickle(mode):
    ref, fused = _pair(mode, "bidir_l2")
    inputs = make_module_inputs(CONFIGS["bidir_l2"].replace(mode=mode))
    expected = run_module(ref, inputs)
    assert_results_close(run_module(copy.deepcopy(fused), inputs), expected)
    assert_results_close(run_module(pickle.loads(pickle.dumps(fused)), inputs), expected)


@pytest.mark.parametrize("mode", MODES)
def test_to_dtype_and_double(mode):
    cfg = CONFIGS["bidir_l2"].replace(mode=mode)
    ref, fused = make_module_twins(cfg, torch.float32)
    ref64 = copy.deepcopy(ref).double()
    f64 = copy.deepcopy(fused).double()
    assert all(p.dtype == torch.float64 for p in f64.parameters())
    inputs = make_module_inputs(cfg, torch.float64)
    assert_results_close(run_module(f64, inputs), run_module(ref64, inputs), what=".double()")
    f64b = copy.deepcopy(fused).to(torch.float64)
    assert_results_close(run_module(f64b, inputs), run_module(ref64, inputs), what=".to(float64)")
    # and back down again
    f32 = f64b.to(dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in f32.parameters())
    inputs32 = make_module_inputs(cfg, torch.float32)
    assert_results_close(run_module(f32, inputs32), run_module(ref, inputs32),
                         atol=1e-5, rtol=1e-5, what=".to(float32)")


@pytest.mark.parametrize("mode", MODES + CELL_MODES)
def test_constructor_device_dtype(mode):
    torch_cls, fused_cls, extra = module_classes(mode)
    kw = dict(extra)
    if mode == "LSTM_PROJ":
        kw["proj_size"] = 2
    m = fused_cls(3, 5, dtype=torch.float64, device="cpu", **kw)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in m.parameters())
    meta = fused_cls(3, 5, device="meta", **kw)
    assert all(p.is_meta for p in meta.parameters())
    half = fused_cls(3, 5, dtype=torch.bfloat16, **kw)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_batch_size_zero(mode, batch_first):
    """torch.nn returns empty outputs for batch 0: the same shapes."""
    cfg = Cfg(mode=mode, num_layers=2, bidirectional=True, batch_first=batch_first)
    ref, fused = make_module_twins(cfg, torch.float64)
    x = torch.randn((0, 4, cfg.input_size) if batch_first else (4, 0, cfg.input_size),
                    dtype=torch.float64)
    out_r, st_r = ref(x)
    out_f, st_f = fused(x)
    assert out_f.shape == out_r.shape
    st_r = st_r if isinstance(st_r, tuple) else (st_r,)
    st_f = st_f if isinstance(st_f, tuple) else (st_f,)
    assert [s.shape for s in st_f] == [s.shape for s in st_r]


@pytest.mark.parametrize("mode", CELL_MODES)
def test_cell_batch_size_zero(mode):
    ref, fused = make_cell_twins(mode, 3, 5)
    x = torch.randn(0, 3, dtype=torch.float64)
    out_r, out_f = ref(x), fused(x)
    out_r = out_r if isinstance(out_r, tuple) else (out_r,)
    out_f = out_f if isinstance(out_f, tuple) else (out_f,)
    assert [s.shape for s in out_f] == [s.shape for s in out_r]


@pytest.mark.parametrize("mode", MODES)
def test_functional_call(mode):
    """torch.func.functional_call with replaced weights: outputs and the
    gradients of the replacement weights match torch.nn's."""
    cfg = CONFIGS["bidir_l2"].replace(mode=mode)
    ref, fused = make_module_twins(cfg, torch.float64)
    g = torch.Generator().manual_seed(9)
    new = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3
           for n, p in ref.named_parameters()}
    inputs = make_module_inputs(cfg)
    results = {}
    for name, m in (("torch", ref), ("fused", fused)):
        params = {n: v.clone().requires_grad_() for n, v in new.items()}
        out, state = torch.func.functional_call(m, params, (inputs["x"], inputs["hx"]))
        states = list(state) if isinstance(state, tuple) else [state]
        loss = sum((t * torch.cos(torch.arange(t.numel(), dtype=t.dtype)).view_as(t)).sum()
                   for t in [out] + states)
        loss.backward()
        results[name] = {"output": out.detach(),
                         **{"grad_" + n: p.grad for n, p in params.items()}}
        assert all(p.grad is None for p in m.parameters())
    assert_results_close(results["fused"], results["torch"], what="functional_call")
    plain = fused(inputs["x"], inputs["hx"])[0]
    assert not torch.allclose(plain, results["fused"]["output"]), "weights were not replaced"
    # the module's own weights are back after the call
    assert_results_close({"o": fused(inputs["x"], inputs["hx"])[0]},
                         {"o": ref(inputs["x"], inputs["hx"])[0]})


@pytest.mark.parametrize("mode", CELL_MODES)
def test_cell_functional_call(mode):
    ref, fused = make_cell_twins(mode, 3, 5)
    g = torch.Generator().manual_seed(9)
    new = {n: torch.randn(p.shape, generator=g, dtype=torch.float64)
           for n, p in ref.named_parameters()}
    inputs = make_cell_inputs(mode, 3, 5, 2)
    o_r = torch.func.functional_call(ref, new, (inputs["x"], inputs["hx"]))
    o_f = torch.func.functional_call(fused, new, (inputs["x"], inputs["hx"]))
    o_r = o_r if isinstance(o_r, tuple) else (o_r,)
    o_f = o_f if isinstance(o_f, tuple) else (o_f,)
    for a, b in zip(o_f, o_r):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_weights_changed_after_construction(mode):
    """In-place updates (an optimizer step) and a reassigned Parameter are
    seen by the next forward."""
    cfg = CONFIGS["bidir_l2"].replace(mode=mode)
    ref, fused = make_module_twins(cfg, torch.float64)
    inputs = make_module_inputs(cfg)
    for m in (ref, fused):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        run_module(m, inputs)
        opt.step()
    assert_results_close(run_module(fused, inputs), run_module(ref, inputs),
                         what="after an optimizer step")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(ref.weight_hh_l1.shape, generator=g, dtype=torch.float64)
    ref.weight_hh_l1 = nn.Parameter(w.clone())
    fused.weight_hh_l1 = nn.Parameter(w.clone())
    assert_results_close(run_module(fused, inputs), run_module(ref, inputs),
                         what="after reassigning weight_hh_l1")


@pytest.mark.parametrize("mode", CELL_MODES)
def test_cell_weights_changed_after_construction(mode):
    ref, fused = make_cell_twins(mode, 3, 5)
    inputs = make_cell_inputs(mode, 3, 5, 2)
    for m in (ref, fused):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        run_cell(m, inputs)
        opt.step()
    assert_results_close(run_cell(fused, inputs), run_cell(ref, inputs))


@pytest.mark.parametrize("mode", MODES)
def test_flatten_parameters_and_train_eval(mode):
    ref, fused = _pair(mode, "bidir_l2")
    fused.flatten_parameters()
    assert fused.eval() is fused and not fused.training
    assert fused.train() is fused and fused.training
    inputs = make_module_inputs(CONFIGS["bidir_l2"].replace(mode=mode))
    assert_results_close(run_module(fused, inputs), run_module(ref, inputs))


POSITIONAL = {
    # torch.nn's positional order: input_size, hidden_size, num_layers, (nonlinearity
    # for RNN), bias, batch_first, dropout, bidirectional, (proj_size for LSTM)
    "LSTM": (4, 6, 2, False, True, 0.25, True, 3),
    "GRU": (4, 6, 3, False, True, 0.5, True),
    "RNN_RELU": (4, 6, 2, "relu", False, True, 0.1, True),
    "LSTMCell": (4, 6, False),
    "GRUCell": (4, 6, False),
    "RNNCell_RELU": (4, 6, False, "relu"),
}


@pytest.mark.parametrize("mode", list(POSITIONAL))
def test_positional_constructor_arguments(mode):
    torch_cls, fused_cls, _ = module_classes(mode)
    torch.manual_seed(0)
    ref = torch_cls(*POSITIONAL[mode])
    torch.manual_seed(0)
    fused = fused_cls(*POSITIONAL[mode])
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "dropout", "bidirectional", "proj_size", "nonlinearity"):
        if hasattr(ref, attr):
            assert getattr(fused, attr) == getattr(ref, attr), attr
    assert [(n, p.shape) for n, p in fused.named_parameters()] == \
        [(n, p.shape) for n, p in ref.named_parameters()]
