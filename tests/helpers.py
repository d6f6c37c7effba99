"""Shared test machinery: torch.nn / fused_rnn twins with copied weights, a
forward + backward with a random upstream gradient that records every output
and every gradient by name, and the two comparison rules.

Comparison rules
- float64: fused and torch.nn agree to about 1e-10 (atol and rtol).
- float32 / bfloat16 / float16 ("twice torch's own error"): with ref64 the
  torch.nn result in float64 for the same (rounded) weights, inputs and
  upstream gradients, max|fused - ref64| <= 2 * max|torch_lowp - ref64| + floor
  where floor = floor_rel * max|ref64| keeps a zero torch error from making
  the check impossible.

Shape legend: T steps, B batch, I input size, H hidden size, P proj_size (or
H), L layers, D directions.
"""

import contextlib
import copy
import dataclasses
import os
import subprocess
import sys
from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn

MODES = ("LSTM", "LSTM_PROJ", "GRU", "RNN_TANH", "RNN_RELU")
CELL_MODES = ("LSTMCell", "GRUCell", "RNNCell_TANH", "RNNCell_RELU")

F64_TOL = dict(atol=1e-10, rtol=1e-10)
# Floor of the "twice torch's error" rule, relative to max|ref64|.
# float32: 1e-6 (about 8 ulp). Half types: one machine epsilon of the dtype
# (one rounding of the largest value). Calibrated on torch itself: its two
# valid bfloat16 CPU LSTM paths (oneDNN and native) fail each other's rule on
# 19 seeds of 20 with a floor of 1e-3 * max|ref64|, and on 1 of 20 with one
# epsilon; a wrong formula is off by many ulp and still fails.
FLOOR_REL = {
    torch.float32: 1e-6,
    torch.float16: 2.0 ** -10,
    torch.bfloat16: 2.0 ** -7,
}


# Columns per staged chunk in the CPU emulation's build of the persistent
# kernels (1024 on a GPU), so that small shapes cover several chunks.
EMULATION_CHUNK = 32


# --------------------------------------------------------------------------
# Module construction
# --------------------------------------------------------------------------

def module_classes(mode):
    """(torch.nn class, fused_rnn class, extra constructor kwargs)."""
    if mode in ("LSTM", "LSTM_PROJ"):
        return nn.LSTM, fused_rnn.LSTM, {}
    if mode == "GRU":
        return nn.GRU, fused_rnn.GRU, {}
    if mode == "RNN_TANH":
        return nn.RNN, fused_rnn.RNN, {"nonlinearity": "tanh"}
    if mode == "RNN_RELU":
        return nn.RNN, fused_rnn.RNN, {"nonlinearity": "relu"}
    if mode == "LSTMCell":
        return nn.LSTMCell, fused_rnn.LSTMCell, {}
    if mode == "GRUCell":
        return nn.GRUCell, fused_rnn.GRUCell, {}
    if mode == "RNNCell_TANH":
        return nn.RNNCell, fused_rnn.RNNCell, {"nonlinearity": "tanh"}
    if mode == "RNNCell_RELU":
        return nn.RNNCell, fused_rnn.RNNCell, {"nonlinearity": "relu"}
    raise ValueError(mode)


def is_lstm(mode):
    return mode.startswith("LSTM")


@dataclasses.dataclass(frozen=True)
class Cfg:
    """One parity case of a multi-layer module."""

    mode: str = "LSTM"
    input_size: int = 7
    hidden_size: int = 17
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    bidirectional: bool = False
    proj_size: int = 0  # only used by mode LSTM_PROJ (0 there means "pick one")
    seq_len: int = 5
    batch: int = 3
    lengths: Optional[Tuple[int, ...]] = None  # packed input when set
    enforce_sorted: bool = True
    unbatched: bool = False
    hx: bool = True  # pass initial states (else omitted)
    dropout: float = 0.0

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    @property
    def directions(self):
        return 2 if self.bidirectional else 1

    @property
    def proj(self):
        if self.mode != "LSTM_PROJ":
            return 0
        if self.proj_size:
            return self.proj_size
        return max(1, min(3, self.hidden_size - 1))

    @property
    def out_size(self):  # P
        return self.proj or self.hidden_size

    @property
    def T(self):
        return max(self.lengths) if self.lengths is not None else self.seq_len

    @property
    def B(self):
        return len(self.lengths) if self.lengths is not None else self.batch

    def ctor_kwargs(self):
        _, _, extra = module_classes(self.mode)
        kw = dict(
            num_layers=self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            **extra,
        )
        if self.mode == "LSTM_PROJ":
            kw["proj_size"] = self.proj
        return kw

    def __str__(self):  # readable pytest ids
        default = Cfg(mode=self.mode)
        parts = [self.mode]
        for f in dataclasses.fields(self):
            if f.name == "mode":
                continue
            v = getattr(self, f.name)
            if v != getattr(default, f.name):
                parts.append(f"{f.name}={v}")
        return ",".join(parts)


def make_module_twins(cfg, dtype=torch.float64, device="cpu", seed=0):
    """(torch.nn module, fused module) with the fused one loaded from the
    torch.nn one's state_dict."""
    torch_cls, fused_cls, _ = module_classes(cfg.mode)
    kw = cfg.ctor_kwargs()
    torch.manual_seed(seed)
    ref = torch_cls(cfg.input_size, cfg.hidden_size, device=device, dtype=dtype, **kw)
    fused = fused_cls(cfg.input_size, cfg.hidden_size, device=device, dtype=dtype, **kw)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def make_cell_twins(mode, input_size, hidden_size, bias=True, dtype=torch.float64,
                    device="cpu", seed=0):
    torch_cls, fused_cls, extra = module_classes(mode)
    torch.manual_seed(seed)
    ref = torch_cls(input_size, hidden_size, bias=bias, device=device, dtype=dtype, **extra)
    fused = fused_cls(input_size, hidden_size, bias=bias, device=device, dtype=dtype, **extra)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

def initial_states(module, batch, device="cpu", seed=2):
    """Random float64 initial states for a multi-layer module (torch.nn or
    fused): [h_0], or [h_0, c_0] for an LSTM."""
    gen = torch.Generator().manual_seed(seed)
    layers = module.num_layers * (2 if module.bidirectional else 1)
    proj = getattr(module, "proj_size", 0) or module.hidden_size
    shapes = [(layers, batch, proj)]
    if isinstance(module, (nn.LSTM, fused_rnn.LSTM)):
        shapes.append((layers, batch, module.hidden_size))
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes]


def _randn(shape, gen, dtype, device, round_dtype=None, scale=1.0):
    """float64 normal numbers, rounded through round_dtype (so a float64
    reference sees exactly the low-precision values), then cast to dtype."""
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if round_dtype is not None:
        t = t.to(round_dtype).to(torch.float64)
    return t.to(device=device, dtype=dtype)


def make_module_inputs(cfg, dtype=torch.float64, device="cpu", seed=1, round_dtype=None):
    """dict(x=padded input, hx=None | h0 | (h0, c0), lengths=None | tuple)."""
    gen = torch.Generator().manual_seed(seed)
    T, B = cfg.T, cfg.B
    if cfg.unbatched:
        xshape = (T, cfg.input_size)
    elif cfg.batch_first:
        xshape = (B, T, cfg.input_size)
    else:
        xshape = (T, B, cfg.input_size)
    x = _randn(xshape, gen, dtype, device, round_dtype)
    if cfg.lengths is not None:
        # zero the padding so that a kernel that reads it is noticed by no one
        # but the gradient check (padding gets zero gradient).
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, n in enumerate(cfg.lengths):
            mask[b, :n] = True
        if not cfg.batch_first:
            mask = mask.t()
        x = x * mask.unsqueeze(-1).to(device=device, dtype=dtype)
    hx = None
    if cfg.hx:
        LD = cfg.num_layers * cfg.directions
        bshape = () if cfg.unbatched else (B,)
        h0 = _randn((LD, *bshape, cfg.out_size), gen, dtype, device, round_dtype, 0.5)
        if is_lstm(cfg.mode):
            c0 = _randn((LD, *bshape, cfg.hidden_size), gen, dtype, device, round_dtype, 0.5)
            hx = (h0, c0)
        else:
            hx = h0
    return dict(x=x, hx=hx, lengths=cfg.lengths)


def convert_inputs(inputs, dtype=None, device=None):
    """The same inputs in another dtype / on another device."""
    def cv(t):
        if t is None:
            return None
        if isinstance(t, tuple):
            return tuple(cv(u) for u in t)
        return t.to(device=device if device is not None else t.device,
                    dtype=dtype if dtype is not None else t.dtype)
    return dict(x=cv(inputs["x"]), hx=cv(inputs["hx"]), lengths=inputs["lengths"])


# --------------------------------------------------------------------------
# Forward + backward
# --------------------------------------------------------------------------

def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def upstream_like(tensors, seed, round_dtype=None):
    """A random upstream gradient per output, the same for every run with the
    same seed and shapes (rounded through round_dtype)."""
    gen = torch.Generator().manual_seed(seed)
    return [_randn(t.shape, gen, t.dtype, t.device, round_dtype) for t in tensors]


def backward_random(outputs, seed, round_dtype=None):
    grads = upstream_like(outputs, seed, round_dtype)
    loss = sum((o * g).sum() for o, g in zip(outputs, grads))
    loss.backward()


def run_module(module, inputs, *, enforce_sorted=True, dropout_seed=None,
               upstream_seed=1234, round_dtype=None, backward=True):
    """Forward + backward of a multi-layer module. Returns an ordered dict of
    every output and every gradient, by name: output, h_n, (c_n),
    grad_input, (grad_h0, grad_c0), grad_<parameter name>, plus exact
    metadata of a packed output (packed_*)."""
    res = OrderedDict()
    module.zero_grad(set_to_none=True)
    x = _leaf(inputs["x"])
    hx = inputs["hx"]
    if hx is not None:
        hx = tuple(_leaf(h) for h in hx) if isinstance(hx, tuple) else _leaf(hx)
    inp = x
    if inputs["lengths"] is not None:
        inp = pack_padded_sequence(x, torch.tensor(inputs["lengths"]),
                                   batch_first=module.batch_first,
                                   enforce_sorted=enforce_sorted)
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    out, state = module(inp) if hx is None else module(inp, hx)
    if isinstance(inp, PackedSequence):
        assert isinstance(out, PackedSequence), f"expected a PackedSequence, got {type(out)}"
        res["packed_batch_sizes"] = out.batch_sizes
        res["packed_sorted_indices"] = out.sorted_indices
        res["packed_unsorted_indices"] = out.unsorted_indices
        out = out.data
    outs = [out]
    res["output"] = out.detach()
    if isinstance(state, tuple):
        assert len(state) == 2, f"LSTM state should be (h_n, c_n), got {len(state)} tensors"
        res["h_n"] = state[0].detach()
        res["c_n"] = state[1].detach()
        outs += list(state)
    else:
        res["h_n"] = state.detach()
        outs.append(state)
    if not backward:
        return res
    backward_random(outs, upstream_seed, round_dtype)
    return _collect_grads(res, x, hx, module)


def _collect_grads(res, x, hx, module):
    """Adds grad_input, grad_h0, (grad_c0) and grad_<parameter name> to res."""
    res["grad_input"] = x.grad
    if isinstance(hx, tuple):
        res["grad_h0"] = hx[0].grad
        res["grad_c0"] = hx[1].grad
    elif hx is not None:
        res["grad_h0"] = hx.grad
    for name, p in module.named_parameters():
        res["grad_" + name] = p.grad
    return res


def make_cell_inputs(mode, input_size, hidden_size, batch, unbatched=False, hx=True,
                     dtype=torch.float64, device="cpu", seed=1, round_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    bshape = () if unbatched else (batch,)
    x = _randn((*bshape, input_size), gen, dtype, device, round_dtype)
    h = None
    if hx:
        h0 = _randn((*bshape, hidden_size), gen, dtype, device, round_dtype, 0.5)
        if mode == "LSTMCell":
            c0 = _randn((*bshape, hidden_size), gen, dtype, device, round_dtype, 0.5)
            h = (h0, c0)
        else:
            h = h0
    return dict(x=x, hx=h, lengths=None)


def run_cell(cell, inputs, *, upstream_seed=1234, round_dtype=None, backward=True):
    """Forward + backward of a cell: h, (c), grad_input, grad_h0, (grad_c0),
    grad_<parameter name>."""
    res = OrderedDict()
    cell.zero_grad(set_to_none=True)
    x = _leaf(inputs["x"])
    hx = inputs["hx"]
    if hx is not None:
        hx = tuple(_leaf(h) for h in hx) if isinstance(hx, tuple) else _leaf(hx)
    out = cell(x) if hx is None else cell(x, hx)
    outs = list(out) if isinstance(out, tuple) else [out]
    res["h"] = outs[0].detach()
    if len(outs) > 1:
        assert len(outs) == 2
        res["c"] = outs[1].detach()
    if not backward:
        return res
    backward_random(outs, upstream_seed, round_dtype)
    return _collect_grads(res, x, hx, cell)


# --------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------

def _check_keys_and_shapes(actual, expected, what):
    problems = []
    if list(actual) != list(expected):
        problems.append(f"keys differ: fused {list(actual)} vs torch {list(expected)}")
    for k in expected:
        if k not in actual:
            continue
        a, e = actual[k], expected[k]
        if (a is None) != (e is None):
            problems.append(f"{k}: fused {'None' if a is None else 'tensor'}, "
                            f"torch {'None' if e is None else 'tensor'}")
            continue
        if a is None:
            continue
        if a.shape != e.shape:
            problems.append(f"{k}: shape fused {tuple(a.shape)} vs torch {tuple(e.shape)}")
        elif a.dtype != e.dtype:
            problems.append(f"{k}: dtype fused {a.dtype} vs torch {e.dtype}")
        elif a.device != e.device:
            problems.append(f"{k}: device fused {a.device} vs torch {e.device}")
    if problems:
        raise AssertionError(f"{what}: " + "; ".join(problems))


def _is_exact(k):
    return k.startswith("packed_")


def max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


def assert_results_close(actual, expected, atol=F64_TOL["atol"], rtol=F64_TOL["rtol"],
                         what="fused vs torch.nn"):
    """Every entry of actual equals expected's within atol + rtol * |expected|
    (exact for packed metadata). Reports every entry that differs."""
    _check_keys_and_shapes(actual, expected, what)
    problems = []
    for k, e in expected.items():
        a = actual[k]
        if a is None:
            continue
        if _is_exact(k):
            if not torch.equal(a.cpu(), e.cpu()):
                problems.append(f"{k}: {a.tolist()} vs {e.tolist()}")
            continue
        if a.numel() == 0:
            continue
        a64, e64 = a.detach().double().cpu(), e.detach().double().cpu()
        if not torch.isfinite(a64).all():
            problems.append(f"{k}: fused has non-finite values")
            continue
        diff = (a64 - e64).abs()
        bad = diff > atol + rtol * e64.abs()
        if bad.any():
            problems.append(f"{k}: max|diff| {diff.max().item():.3e} "
                            f"(max|torch| {max_abs(e64):.3e}, {int(bad.sum())}/{bad.numel()} "
                            f"elements outside atol={atol:g} rtol={rtol:g})")
    if problems:
        raise AssertionError(f"{what}:\n  " + "\n  ".join(problems))


# Gradients of a ReLU network in a half type are not continuous in the
# forward values: a pre-activation within one rounding of 0 switches its unit
# on or off, at random in either implementation (measured on a bfloat16 RNN
# relu, hidden 64: fused flips 2 masks and torch 0 on one seed, fused 2 and
# torch 3 on another; the flipped units move the gradients by 10-40%). There
# the gradients only get a loose norm check (a wrong derivative is off by
# O(1)); float32 / float64 check them exactly.
DISCONTINUOUS_GRAD_REL = 0.25


def assert_twice_torch_error(fused, torch_low, ref64, factor=2.0, floor_rel=None,
                             what="fused vs torch.nn", discontinuous=False):
    """max|fused - ref64| <= factor * max|torch_low - ref64| + floor_rel * max|ref64|,
    entry by entry. With discontinuous=True (ReLU in a half type) the grad_*
    entries instead need ||fused - ref64|| <= factor * ||torch_low - ref64||
    + DISCONTINUOUS_GRAD_REL * ||ref64||."""
    _check_keys_and_shapes(fused, torch_low, what)
    problems = []
    for k, t in torch_low.items():
        f = fused[k]
        if f is None:
            continue
        if _is_exact(k):
            if not torch.equal(f, t):
                problems.append(f"{k}: {f.tolist()} vs {t.tolist()}")
            continue
        if t.numel() == 0:
            continue
        r = ref64[k].detach().double().cpu()
        f64, t64 = f.detach().double().cpu(), t.detach().double().cpu()
        if not torch.isfinite(f64).all():
            problems.append(f"{k}: fused has non-finite values")
            continue
        if discontinuous and k.startswith("grad_"):
            err_f, err_t, norm = (f64 - r).norm().item(), (t64 - r).norm().item(), r.norm().item()
            if not err_f <= factor * err_t + DISCONTINUOUS_GRAD_REL * norm + 1e-30:
                problems.append(f"{k}: ||fused-ref64|| {err_f:.3e} > {factor:g} * "
                                f"||torch-ref64|| {err_t:.3e} + {DISCONTINUOUS_GRAD_REL} * "
                                f"||ref64|| {norm:.3e}")
            continue
        fr = floor_rel if floor_rel is not None else FLOOR_REL[t.dtype]
        err_f = max_abs(f64 - r)
        err_t = max_abs(t64 - r)
        bound = factor * err_t + fr * max_abs(r) + 1e-30
        if not err_f <= bound:
            problems.append(f"{k}: max|fused-ref64| {err_f:.3e} > {factor:g} * "
                            f"max|torch-ref64| {err_t:.3e} + floor {fr * max_abs(r):.3e} "
                            f"(max|ref64| {max_abs(r):.3e})")
    if problems:
        dtype = next(v.dtype for k, v in torch_low.items() if v is not None and not _is_exact(k))
        raise AssertionError(f"{what} ({dtype}):\n  " + "\n  ".join(problems))


def is_discontinuous(mode, dtype):
    """ReLU gradients in a half type (see DISCONTINUOUS_GRAD_REL)."""
    return mode in ("RNN_RELU", "RNNCell_RELU", "rnn_relu") and dtype in (torch.float16,
                                                                          torch.bfloat16)


# --------------------------------------------------------------------------
# Whole checks
# --------------------------------------------------------------------------

def check_module_parity(cfg, dtype=torch.float64, device="cpu", seed=0, ref_device="cpu",
                        train=True, dropout_seed=None):
    """fused vs torch.nn for one configuration: every output and gradient.
    float64 tight; lower precision by the twice-torch's-error rule against
    torch.nn in float64 (on ref_device)."""
    ref, fused = make_module_twins(cfg, dtype=dtype, device=device, seed=seed)
    ref.train(train)
    fused.train(train)
    kw = dict(enforce_sorted=cfg.enforce_sorted, dropout_seed=dropout_seed)
    if dtype == torch.float64:
        inputs = make_module_inputs(cfg, dtype, device)
        expected = run_module(ref, inputs, **kw)
        actual = run_module(fused, inputs, **kw)
        assert_results_close(actual, expected, what=f"{cfg} float64")
        return actual, expected
    inputs = make_module_inputs(cfg, dtype, device, round_dtype=dtype)
    ref64 = copy.deepcopy(ref).to(device=ref_device, dtype=torch.float64)
    inputs64 = convert_inputs(inputs, torch.float64, ref_device)
    r64 = run_module(ref64, inputs64, round_dtype=dtype, **kw)
    low = run_module(ref, inputs, round_dtype=dtype, **kw)
    act = run_module(fused, inputs, round_dtype=dtype, **kw)
    assert_twice_torch_error(act, low, r64, what=str(cfg),
                             discontinuous=is_discontinuous(cfg.mode, dtype))
    return act, low


def check_cell_parity(mode, input_size, hidden_size, batch, *, bias=True, unbatched=False,
                      hx=True, dtype=torch.float64, device="cpu", ref_device="cpu"):
    ref, fused = make_cell_twins(mode, input_size, hidden_size, bias, dtype, device)
    what = (f"{mode} I={input_size} H={hidden_size} B={batch} bias={bias} "
            f"unbatched={unbatched} hx={hx}")
    if dtype == torch.float64:
        inputs = make_cell_inputs(mode, input_size, hidden_size, batch, unbatched, hx,
                                  dtype, device)
        expected = run_cell(ref, inputs)
        actual = run_cell(fused, inputs)
        assert_results_close(actual, expected, what=what)
        return
    inputs = make_cell_inputs(mode, input_size, hidden_size, batch, unbatched, hx,
                              dtype, device, round_dtype=dtype)
    ref64 = copy.deepcopy(ref).to(device=ref_device, dtype=torch.float64)
    r64 = run_cell(ref64, convert_inputs(inputs, torch.float64, ref_device), round_dtype=dtype)
    low = run_cell(ref, inputs, round_dtype=dtype)
    act = run_cell(fused, inputs, round_dtype=dtype)
    assert_twice_torch_error(act, low, r64, what=what,
                             discontinuous=is_discontinuous(mode, dtype))


# --------------------------------------------------------------------------
# Single-layer, single-direction reference for the raw ops (torch's own
# kernels through torch._VF; the reverse direction is the second half of a
# bidirectional layer whose forward half gets detached copies).
# --------------------------------------------------------------------------

def reference_op(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                 relu=False):
    """cell in {"lstm", "gru", "rnn"}. Returns (output, hy[, cy]) like the
    fused_rnn.ops wrappers, differentiable. Called with train=True (dropout
    is 0, so it changes nothing else): cuDNN refuses a backward through an
    RNN run with train=False."""
    has_bias = b_ih is not None
    layer = [w_ih, w_hh] + ([b_ih, b_hh] if has_bias else []) + ([w_hr] if w_hr is not None else [])
    if reverse:
        params = [p.detach().clone() for p in layer] + layer
        hx2 = torch.stack([hx.detach().clone(), hx])
        cx2 = torch.stack([cx.detach().clone(), cx]) if cx is not None else None
    else:
        params = layer
        hx2 = hx.unsqueeze(0)
        cx2 = cx.unsqueeze(0) if cx is not None else None
    bidir = bool(reverse)
    if cell == "lstm":
        state = (hx2, cx2)
        if batch_sizes is None:
            out, hy, cy = torch._VF.lstm(input, state, params, has_bias, 1, 0.0, True, bidir,
                                         False)
        else:
            out, hy, cy = torch._VF.lstm(input, batch_sizes, state, params, has_bias, 1, 0.0,
                                         True, bidir)
    else:
        if cell == "gru":
            fn = torch._VF.gru
        else:
            fn = torch._VF.rnn_relu if relu else torch._VF.rnn_tanh
        if batch_sizes is None:
            out, hy = fn(input, hx2, params, has_bias, 1, 0.0, True, bidir, False)
        else:
            out, hy = fn(input, batch_sizes, hx2, params, has_bias, 1, 0.0, True, bidir)
        cy = None
    P = hx.shape[-1]
    if reverse:
        out = out[..., P:]
        hy = hy[1]
        cy = cy[1] if cy is not None else None
    else:
        hy = hy[0]
        cy = cy[0] if cy is not None else None
    return (out, hy, cy) if cell == "lstm" else (out, hy)


def make_op_args(cell, T=4, B=3, I=5, H=7, P=0, bias=True, lengths=None, reverse=False,
                 dtype=torch.float64, device="cpu", seed=0, requires_grad=False, relu=False):
    """Arguments of a fused_rnn.ops wrapper, as a dict. lengths (sorted
    non-increasing, len B) makes a packed input."""
    gen = torch.Generator().manual_seed(seed)
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    Pout = P or H

    def r(*shape, scale=1.0):
        return _randn(shape, gen, dtype, device, None, scale)

    if lengths is not None:
        lengths = list(lengths)
        assert lengths == sorted(lengths, reverse=True) and len(lengths) == B
        T = max(lengths)
        batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(T)],
                                   dtype=torch.int64)
        input = r(int(batch_sizes.sum()), I)
    else:
        batch_sizes = None
        input = r(T, B, I)
    k = H ** -0.5
    args = OrderedDict(
        input=input,
        hx=r(B, Pout, scale=0.5),
        cx=r(B, H, scale=0.5) if cell == "lstm" else None,
        w_ih=r(G * H, I, scale=k),
        w_hh=r(G * H, Pout, scale=k),
        b_ih=r(G * H, scale=k) if bias else None,
        b_hh=r(G * H, scale=k) if bias else None,
        w_hr=r(P, H, scale=k) if P else None,
    )
    if cell != "lstm":
        del args["cx"], args["w_hr"]
    if requires_grad:
        for t in args.values():
            if t is not None:
                t.requires_grad_(True)
    args["batch_sizes"] = batch_sizes
    args["reverse"] = reverse
    if cell == "rnn":
        args["relu"] = relu
    return args


def call_wrapper(cell, args):
    """fused_rnn.ops.<cell>(*args) positionally."""
    fn = getattr(fused_rnn.ops, cell)
    return fn(*args.values())


def call_reference(cell, args):
    a = dict(args)
    if cell == "lstm":
        return reference_op("lstm", a["input"], a["hx"], a["cx"], a["w_ih"], a["w_hh"],
                            a["b_ih"], a["b_hh"], a["w_hr"], a["batch_sizes"], a["reverse"])
    return reference_op(cell, a["input"], a["hx"], None, a["w_ih"], a["w_hh"], a["b_ih"],
                        a["b_hh"], None, a["batch_sizes"], a["reverse"], a.get("relu", False))


# (cell, extra make_op_args kwargs) of the op tests; the cell names of fused_rnn.ops
OP_CELLS = {
    "lstm": ("lstm", {}),
    "lstm_proj": ("lstm", {"P": 3}),
    "gru": ("gru", {}),
    "rnn_tanh": ("rnn", {"relu": False}),
    "rnn_relu": ("rnn", {"relu": True}),
}

# the per-direction arguments of each cell's _pair op, in schema order
PAIR_PER_DIRECTION = {
    "lstm": ("hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"),
    "gru": ("hx", "w_ih", "w_hh", "b_ih", "b_hh"),
    "rnn": ("hx", "w_ih", "w_hh", "b_ih", "b_hh"),
}


def call_pair(cell, a, b):
    """fused_rnn.ops.<cell>_pair on the op arguments of the forward (a) and
    reverse (b) direction over a's input: (output, *states, output_r,
    *states_r)."""
    args = [a["input"], *(a[k] for k in PAIR_PER_DIRECTION[cell]),
            *(b[k] for k in PAIR_PER_DIRECTION[cell]), a["batch_sizes"]]
    if cell == "rnn":
        return fused_rnn.ops.rnn_pair(*args, relu=a["relu"])
    return getattr(fused_rnn.ops, f"{cell}_pair")(*args)


def gradcheck_op(cell, args):
    """torch.autograd.gradcheck of fused_rnn.ops.<cell> with respect to every
    tensor of `args` that requires grad (float64)."""
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*ts):
        a = dict(args)
        a.update(zip(names, ts))
        return call_wrapper(cell, a)

    return torch.autograd.gradcheck(fn, [args[k] for k in names], eps=1e-6, atol=1e-7, rtol=1e-5)


def python_lines(code, var, value=None):
    """The output lines of `code` run by a fresh Python with the environment
    variable `var` set to `value` (removed when None): what a setting read
    once per process does at start-up."""
    env = {k: v for k, v in os.environ.items() if k != var}
    if value is not None:
        env[var] = value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()


@contextlib.contextmanager
def tf32_flags(cudnn, matmul=False):
    """torch's TF32 flags for cuDNN (which torch.nn's float32 RNNs and
    fused_rnn's persistent kernels follow) and for cuBLAS's products, set
    for the body of a ``with`` and restored afterwards."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def extension_build_dir(name, sources):
    """A build folder (under the temp dir) for a test extension made of
    `sources`, one per torch release and content of the sources: releases
    differ in how they lock a build folder (a lock file one leaves behind,
    another waits on forever), and a build for one release does not load in
    another."""
    import hashlib
    import tempfile

    digest = hashlib.sha1(torch.__version__.encode())
    for path in sources:
        with open(path, "rb") as f:
            digest.update(f.read())
    build = os.path.join(tempfile.gettempdir(), f"{name}_{digest.hexdigest()[:12]}")
    os.makedirs(build, exist_ok=True)
    return build
