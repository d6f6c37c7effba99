"""Randomised parity with torch.nn (hypothesis): cell, layers, directions,
batch_first, bias, proj_size, sizes, sequence length, batch, packing with
random lengths, initial states given or omitted, dropout (training, same
seed); float64, every output and gradient."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import Cfg, check_module_parity


@st.composite
def configs(draw):
    mode = draw(st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]))
    hidden = draw(st.sampled_from([1, 2, 3, 5, 7]))
    proj = 0
    if mode == "LSTM" and hidden > 1 and draw(st.booleans()):
        proj = draw(st.integers(1, hidden - 1))
    batch = draw(st.integers(1, 5))
    packed = draw(st.booleans())
    unbatched = not packed and draw(st.integers(0, 4)) == 0
    lengths = None
    enforce_sorted = True
    if packed:
        lengths = tuple(draw(st.lists(st.integers(1, 6), min_size=batch, max_size=batch)))
        enforce_sorted = draw(st.booleans())
        if enforce_sorted:
            lengths = tuple(sorted(lengths, reverse=True))
    return Cfg(
        mode="LSTM_PROJ" if proj else mode,
        proj_size=proj,
        input_size=draw(st.sampled_from([1, 2, 3, 4, 7])),
        hidden_size=hidden,
        num_layers=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
        seq_len=draw(st.integers(1, 6)),
        batch=batch,
        lengths=lengths,
        enforce_sorted=enforce_sorted,
        unbatched=unbatched,
        hx=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.5])),
    )


@settings(max_examples=25, deadline=None)
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_random_parity_float64(cfg, seed):
    # training mode; with dropout the same seed before each forward
    check_module_parity(cfg, torch.float64, seed=seed, dropout_seed=seed + 1)
