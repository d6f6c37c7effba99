"""The math of each cell as a plain PyTorch loop: what the fused kernels
compute, written to be read. Same results as fused_rnn.ops (dense or packed
input, either direction), differentiable by autograd to any order: the
tests use it as a third, independent implementation beside torch.nn, and
fused_rnn.ops differentiates through it where a backward must itself be
differentiable (create_graph=True: gradient penalties, Hessian-vector
products).

Shapes: input (T, B, I), or packed (N, I) with batch_sizes (T,) (an int64
CPU tensor, non-increasing: step t covers the first batch_sizes[t]
sequences); hx (B, P); cx (B, H); gate order as torch.nn.
"""

import torch
from torch import Tensor


def _run(step, input: Tensor, states: list, reverse: bool, batch_sizes: Tensor | None):
    """states := step(x_t, *rows of states) over the steps of the sequence
    (the first state is the output h); returns (output, final states). A
    step of packed input updates the rows of the sequences it covers; the
    others keep their state (in time order, those that ended; in reverse,
    those that have not started, still at their initial state)."""
    dense = batch_sizes is None
    T = input.shape[0] if dense else batch_sizes.shape[0]
    sizes = [input.shape[1]] * T if dense else [int(n) for n in batch_sizes.tolist()]
    x_rows = input.reshape(-1, input.shape[-1]) if dense else input
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    outputs = {}
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        n = sizes[t]
        new = step(x_rows[offsets[t]:offsets[t] + n], *(s[:n] for s in states))
        states = [u if n == s.shape[0] else torch.cat([u, s[n:]]) for u, s in zip(new, states)]
        outputs[t] = new[0]
    out = torch.cat([outputs[t] for t in range(T)])
    return (out.view(T, -1, out.shape[-1]) if dense else out), states


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


def lstm(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, reverse=False,
         batch_sizes=None):
    def step(x, h, c):
        return lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr)

    out, (h, c) = _run(step, input, [hx, cx], reverse, batch_sizes)
    return out, h, c


def gru(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False, batch_sizes=None):
    def step(x, h):
        return (gru_cell(x, h, w_ih, w_hh, b_ih, b_hh),)

    out, (h,) = _run(step, input, [hx], reverse, batch_sizes)
    return out, h


def rnn(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False, relu=False,
        batch_sizes=None):
    def step(x, h):
        return (rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, relu),)

    out, (h,) = _run(step, input, [hx], reverse, batch_sizes)
    return out, h
