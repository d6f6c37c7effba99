"""The math of each cell as a plain PyTorch loop: what the fused kernels
compute, written to be read. Same signatures and results as fused_rnn.ops
(dense input only), differentiable by autograd; used by the tests as a third,
independent implementation beside torch.nn.

Shapes: input (T, B, I); hx (B, P); cx (B, H); gate order as torch.nn.
"""

import torch
from torch import Tensor


def _steps(input: Tensor, reverse: bool):
    order = range(input.shape[0] - 1, -1, -1) if reverse else range(input.shape[0])
    return [(t, input[t]) for t in order]


def _stack(outputs: dict, length: int) -> Tensor:
    return torch.stack([outputs[t] for t in range(length)])


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
    gates = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c = f * c + i * g
    h = o * c.tanh()
    if w_hr is not None:
        h = h @ w_hr.T
    return h, c


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    xg = x @ w_ih.T
    hg = h @ w_hh.T
    if b_ih is not None:
        xg, hg = xg + b_ih, hg + b_hh
    xr, xz, xn = xg.chunk(3, dim=1)
    hr, hz, hn = hg.chunk(3, dim=1)
    r = (xr + hr).sigmoid()
    z = (xz + hz).sigmoid()
    n = (xn + r * hn).tanh()
    return (1 - z) * n + z * h


def rnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, relu=False):
    pre = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        pre = pre + b_ih + b_hh
    return pre.relu() if relu else pre.tanh()


def lstm(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, reverse=False):
    outputs, h, c = {}, hx, cx
    for t, x in _steps(input, reverse):
        h, c = lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
        outputs[t] = h
    return _stack(outputs, input.shape[0]), h, c


def gru(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False):
    outputs, h = {}, hx
    for t, x in _steps(input, reverse):
        h = gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
        outputs[t] = h
    return _stack(outputs, input.shape[0]), h


def rnn(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False, relu=False):
    outputs, h = {}, hx
    for t, x in _steps(input, reverse):
        h = rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, relu)
        outputs[t] = h
    return _stack(outputs, input.shape[0]), h
