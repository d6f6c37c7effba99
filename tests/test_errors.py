"""Bad arguments raise the same exception type as torch.nn (run torch.nn
first, capture its exception, then expect the same type from fused_rnn)."""

import pytest
import torch

from helpers import CELL_MODES, MODES, is_lstm, module_classes


def torch_error(fn):
    """The exception torch.nn raises for fn (the test is wrong if none)."""
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def assert_same_error(make_call, message=None):
    """make_call(which) -> a zero-argument callable; which in {"torch", "fused"}."""
    expected = torch_error(make_call("torch"))
    with pytest.raises(type(expected)) as info:
        make_call("fused")()
    assert str(info.value), "the error should say what is wrong"
    if message is not None:
        assert message in str(expected), "test assumption about torch's message"
        assert message in str(info.value)
    return expected, info.value


def _cls(mode, which):
    torch_cls, fused_cls, extra = module_classes(mode)
    return (torch_cls if which == "torch" else fused_cls), extra


def _module(mode, which, I=3, H=5, **kw):
    cls, extra = _cls(mode, which)
    kw = {**extra, **kw}
    if mode == "LSTM_PROJ":
        kw.setdefault("proj_size", 2)
    torch.manual_seed(0)
    return cls(I, H, **kw)


def _P(mode, H=5):
    return 2 if mode == "LSTM_PROJ" else H


def _hx(mode, h, c=None):
    return (h, c) if is_lstm(mode) else h


def _states(mode, LD=2, B=(2,), H=5, dtype=torch.float32, device="cpu"):
    h = torch.randn(LD, *B, _P(mode, H), dtype=dtype, device=device)
    c = torch.randn(LD, *B, H, dtype=dtype, device=device)
    return _hx(mode, h, c)


# --------------------------------------------------------------------------
# Multi-layer modules: forward
# --------------------------------------------------------------------------

def forward_cases(mode):
    L = 2

    def state(B=(2,), LD=L):
        return _states(mode, LD, B)

    cases = {
        "input_1d": lambda: (torch.randn(3), None),
        "input_4d": lambda: (torch.randn(2, 2, 2, 3), None),
        "input_0d": lambda: (torch.randn(()), None),
        "wrong_feature_size": lambda: (torch.randn(4, 2, 4), None),
        "wrong_feature_size_unbatched": lambda: (torch.randn(4, 4), None),
        "h0_wrong_batch": lambda: (torch.randn(4, 2, 3),
                                   _hx(mode, torch.randn(L, 3, _P(mode)), torch.randn(L, 2, 5))),
        "h0_wrong_layers": lambda: (torch.randn(4, 2, 3),
                                    _hx(mode, torch.randn(1, 2, _P(mode)), torch.randn(L, 2, 5))),
        "h0_wrong_size": lambda: (torch.randn(4, 2, 3),
                                  _hx(mode, torch.randn(L, 2, _P(mode) + 1), torch.randn(L, 2, 5))),
        "batched_input_unbatched_hx": lambda: (torch.randn(4, 2, 3), state(B=())),
        "unbatched_input_batched_hx": lambda: (torch.randn(4, 3), state(B=(1,))),
        "input_dtype_not_weight_dtype": lambda: (torch.randn(4, 2, 3, dtype=torch.float64), None),
        "hx_dtype_not_input_dtype": lambda: (
            torch.randn(4, 2, 3),
            _hx(mode, torch.randn(L, 2, _P(mode), dtype=torch.float64),
                torch.randn(L, 2, 5, dtype=torch.float64))),
        "input_on_meta": lambda: (torch.randn(4, 2, 3, device="meta"), None),
        "seq_len_0": lambda: (torch.randn(0, 2, 3), None),
        "seq_len_0_unbatched": lambda: (torch.randn(0, 3), None),
    }
    if is_lstm(mode):
        cases.update({
            "c0_wrong_batch": lambda: (torch.randn(4, 2, 3),
                                       (torch.randn(L, 2, _P(mode)), torch.randn(L, 3, 5))),
            "c0_wrong_size": lambda: (torch.randn(4, 2, 3),
                                      (torch.randn(L, 2, _P(mode)), torch.randn(L, 2, 4))),
            "c0_wrong_layers": lambda: (torch.randn(4, 2, 3),
                                        (torch.randn(L, 2, _P(mode)), torch.randn(3, 2, 5))),
            "c0_dtype": lambda: (torch.randn(4, 2, 3),
                                 (torch.randn(L, 2, _P(mode)),
                                  torch.randn(L, 2, 5, dtype=torch.float64))),
            "hx_not_a_tuple": lambda: (torch.randn(4, 2, 3), torch.randn(L, 2, _P(mode))),
            # (h, c) stacked into one tensor: every hx[i] has the right
            # shape without projection, so only the container is wrong
            "hx_stacked_tensor": lambda: (torch.randn(4, 2, 3), torch.randn(2, L, 2, _P(mode))),
            "hx_three_states": lambda: (torch.randn(4, 2, 3),
                                        (torch.randn(L, 2, _P(mode)), torch.randn(L, 2, 5),
                                         torch.randn(L, 2, 5))),
            "hx_one_state": lambda: (torch.randn(4, 2, 3), (torch.randn(L, 2, _P(mode)),)),
            "hx_c_none": lambda: (torch.randn(4, 2, 3), (torch.randn(L, 2, _P(mode)), None)),
            "h0_only_unbatched": lambda: (torch.randn(4, 3),
                                          (torch.randn(L, _P(mode)), torch.randn(L, 1, 5))),
        })
    return cases


FORWARD_CASES = [(m, c) for m in MODES for c in forward_cases(m)]


@pytest.mark.parametrize("mode,case", FORWARD_CASES, ids=[f"{m}-{c}" for m, c in FORWARD_CASES])
def test_forward_error_same_type(mode, case):
    x, hx = forward_cases(mode)[case]()

    def make_call(which):
        m = _module(mode, which, num_layers=2)
        return lambda: m(x) if hx is None else m(x, hx)

    message = None
    if case.startswith("seq_len_0"):
        message = "Expected sequence length to be larger than 0 in RNN"
    assert_same_error(make_call, message)


@pytest.mark.parametrize("mode", MODES)
def test_packed_hx_wrong_batch(mode):
    def make_call(which):
        m = _module(mode, which, num_layers=1, bidirectional=True)
        x = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(4, 3, 3), [4, 2, 1],
                                                    enforce_sorted=True)
        return lambda: m(x, _states(mode, LD=2, B=(2,)))

    assert_same_error(make_call)


def _packed(sorted_, dtype=torch.float32):
    lengths = [4, 2, 1] if sorted_ else [2, 4, 1]
    return torch.nn.utils.rnn.pack_padded_sequence(torch.randn(4, 3, 3, dtype=dtype), lengths,
                                                   enforce_sorted=sorted_)


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("mode", MODES)
def test_packed_input_dtype_not_weight_dtype(mode, sorted_):
    """torch.nn.LSTM runs packed input without its argument checks (its
    error comes from a product, a RuntimeError); GRU and RNN check it (a
    ValueError)."""
    def make_call(which):
        m = _module(mode, which)
        x = _packed(sorted_, torch.float64)
        return lambda: m(x)

    assert_same_error(make_call)


LSTM_HX_CONTAINERS = {
    "stacked_tensor": lambda P: torch.randn(2, 1, 3, P),
    "one_tensor": lambda P: torch.randn(1, 3, P),
    "three_states": lambda P: (torch.randn(1, 3, P), torch.randn(1, 3, 5), torch.randn(1, 3, 5)),
    "one_state": lambda P: (torch.randn(1, 3, P),),
    "c_none": lambda P: (torch.randn(1, 3, P), None),
}


@pytest.mark.parametrize("hx", list(LSTM_HX_CONTAINERS))
@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("mode", ["LSTM", "LSTM_PROJ"])
def test_packed_lstm_hx_container(mode, sorted_, hx):
    """Packed input with hx not a pair: the error torch.nn raises, or where
    it runs (its permutation of unsorted input indexes hx[0] and hx[1]) the
    same outputs, states and gradients."""
    padded = torch.randn(4, 3, 3)
    lengths = [4, 2, 1] if sorted_ else [2, 4, 1]
    states = LSTM_HX_CONTAINERS[hx](_P(mode))
    ref, fused = _module(mode, "torch"), _module(mode, "fused")
    fused.load_state_dict(ref.state_dict())

    def run(module):
        x = padded.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=sorted_)
        return _results_and_grads(module, x, packed, states)

    try:
        expected = run(ref)
    except Exception as error:  # noqa: BLE001 (torch's own type is the expectation)
        with pytest.raises(type(error)):
            run(fused)
        return
    _assert_same(run(fused), expected)


def _leaves(states):
    """states with every tensor a fresh leaf that requires grad (the
    container kept: a tuple, or one stacked tensor)."""
    if isinstance(states, torch.Tensor):
        return states.clone().requires_grad_()
    return tuple(s.clone().requires_grad_() for s in states)


def _results_and_grads(module, x, inp, states):
    """module(inp, states): the output, the final states, and after a
    backward of random weights over them the gradients of x, of each state
    leaf and of every parameter."""
    module.zero_grad()
    leaves = _leaves(states)
    output, (h, c) = module(inp, leaves)
    output = output.data if isinstance(output, torch.nn.utils.rnn.PackedSequence) else output
    torch.manual_seed(3)
    outs = [output, h, c]
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    leaf_list = [leaves] if isinstance(leaves, torch.Tensor) else list(leaves)
    return ([o.detach() for o in outs] + [x.grad] + [leaf.grad for leaf in leaf_list]
            + [p.grad for p in module.parameters()])


def _assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode,hx", [("LSTM", "stacked_tensor"), ("LSTM", "three_states"),
                                     ("LSTM_PROJ", "three_states")])
def test_unbatched_lstm_takes_the_first_two_states(mode, hx):
    """An unbatched input's hx is indexed as torch.nn does: a stacked (2,
    L*D, H) tensor (h and c of one size: no projection), or the first two of
    three states, work as (h, c): the same outputs, states and gradients (the
    third state gets none)."""
    P = _P(mode)
    states = (torch.randn(2, 1, P) if hx == "stacked_tensor"
              else (torch.randn(1, P), torch.randn(1, 5), torch.randn(1, 5)))
    ref, fused = _module(mode, "torch"), _module(mode, "fused")
    fused.load_state_dict(ref.state_dict())
    padded = torch.randn(4, 3)

    def run(module):
        x = padded.clone().requires_grad_()
        return _results_and_grads(module, x, x, states)

    _assert_same(run(fused), run(ref))


# --------------------------------------------------------------------------
# Multi-layer modules: constructor
# --------------------------------------------------------------------------

CTOR_CASES = {
    "dropout_above_1": dict(dropout=1.5),
    "dropout_negative": dict(dropout=-0.1),
    "dropout_bool": dict(dropout=True),
    "dropout_str": dict(dropout="a"),
    "proj_equal_hidden": dict(proj_size=5),
    "proj_above_hidden": dict(proj_size=7),
    "proj_negative": dict(proj_size=-1),
    "num_layers_0": dict(num_layers=0),
    "hidden_size_0": dict(H=0),
    "hidden_size_float": dict(H=5.0),
    "input_size_0": dict(I=0),
    "bias_not_bool": dict(bias=1),
}


@pytest.mark.parametrize("case", list(CTOR_CASES))
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_constructor_error_same_type(mode, case):
    kw = dict(CTOR_CASES[case])
    I = kw.pop("I", 3)
    H = kw.pop("H", 5)

    def make_call(which):
        cls, extra = _cls(mode, which)
        return lambda: cls(I, H, **{**extra, **kw})

    assert_same_error(make_call)


@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("mode", ["GRU", "RNN_TANH", "RNN_RELU"])
def test_proj_size_only_for_lstm(mode, proj_size):
    assert_same_error(lambda which: lambda: _module(mode, which, proj_size=proj_size),
                      "proj_size argument is only supported for LSTM")


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "TANH", None])
def test_rnn_invalid_nonlinearity(nonlinearity):
    def make_call(which):
        cls = torch.nn.RNN if which == "torch" else module_classes("RNN_TANH")[1]
        return lambda: cls(3, 5, nonlinearity=nonlinearity)

    assert_same_error(make_call)


@pytest.mark.parametrize("input_dim", [2, 3])
def test_rnn_cell_invalid_nonlinearity(input_dim):
    """torch.nn.RNNCell accepts any string and fails on forward: construction
    and forward together must raise the same type; a 3-D input is named
    first."""
    def make_call(which):
        cls = torch.nn.RNNCell if which == "torch" else module_classes("RNNCell_TANH")[1]

        def call():
            cls(3, 5, nonlinearity="sigmoid")(torch.randn((2,) * (input_dim - 1) + (3,)))

        return call

    assert_same_error(make_call)


# --------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------

def cell_cases(mode):
    lstm = mode == "LSTMCell"

    def hx(h, c=None):
        return (h, c if c is not None else torch.randn(h.shape[:-1] + (5,))) if lstm else h

    cases = {
        "input_3d": lambda: (torch.randn(2, 2, 3), None),
        "input_0d": lambda: (torch.randn(()), None),
        "wrong_input_size": lambda: (torch.randn(2, 4), None),
        "wrong_input_size_unbatched": lambda: (torch.randn(4), None),
        "hx_wrong_batch": lambda: (torch.randn(2, 3), hx(torch.randn(3, 5))),
        "hx_wrong_size": lambda: (torch.randn(2, 3), hx(torch.randn(2, 4), torch.randn(2, 5))),
        "hx_1d_batched_input": lambda: (torch.randn(2, 3), hx(torch.randn(5), torch.randn(5))),
        "hx_2d_unbatched_input": lambda: (torch.randn(3), hx(torch.randn(1, 5), torch.randn(1, 5))),
        "hx_3d": lambda: (torch.randn(2, 3), hx(torch.randn(1, 2, 5), torch.randn(1, 2, 5))),
        "input_dtype": lambda: (torch.randn(2, 3, dtype=torch.float64), None),
        "input_on_meta": lambda: (torch.randn(2, 3, device="meta"), None),
        # both wrong: torch.nn names the input first
        "input_3d_and_hx_3d": lambda: (torch.randn(2, 2, 3), hx(torch.randn(1, 2, 5),
                                                                torch.randn(1, 2, 5))),
    }
    if lstm:
        cases["hx_one_state"] = lambda: (torch.randn(2, 3), (torch.randn(2, 5),))
        cases["hx_three_states"] = lambda: (torch.randn(2, 3), (torch.randn(2, 5),) * 3)
        cases["hx_a_tensor"] = lambda: (torch.randn(2, 3), torch.randn(2, 5))
        cases["hx_stacked"] = lambda: (torch.randn(2, 3), torch.randn(2, 2, 5))
        cases["hx_one_state_unbatched"] = lambda: (torch.randn(3), (torch.randn(5),))
        cases["cx_wrong_batch"] = lambda: (torch.randn(2, 3),
                                           (torch.randn(2, 5), torch.randn(3, 5)))
        cases["cx_wrong_size"] = lambda: (torch.randn(2, 3), (torch.randn(2, 5), torch.randn(2, 4)))
    return cases


CELL_CASES = [(m, c) for m in CELL_MODES for c in cell_cases(m)]


@pytest.mark.parametrize("mode,case", CELL_CASES, ids=[f"{m}-{c}" for m, c in CELL_CASES])
def test_cell_error_same_type(mode, case):
    x, hx = cell_cases(mode)[case]()

    def make_call(which):
        cls, extra = _cls(mode, which)
        torch.manual_seed(0)
        cell = cls(3, 5, **extra)
        return lambda: cell(x) if hx is None else cell(x, hx)

    assert_same_error(make_call)


@pytest.mark.parametrize("hx", ["tensor", "three"])
def test_lstm_cell_unbatched_takes_the_first_two_states(hx):
    """torch.nn.LSTMCell takes an unbatched input's states as hx[0] and
    hx[1]: a (2, H) tensor, or the first two of three, work as (h, c)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(3, 5)
    fused = module_classes("LSTMCell")[1](3, 5)
    fused.load_state_dict(ref.state_dict())
    padded = torch.randn(3)
    states = torch.randn(2, 5) if hx == "tensor" else tuple(torch.randn(3, 5).unbind(0))

    def run(cell):
        cell.zero_grad()
        x = padded.clone().requires_grad_()
        leaves = _leaves(states)
        outs = list(cell(x, leaves))
        torch.manual_seed(3)
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
        leaf_list = [leaves] if isinstance(leaves, torch.Tensor) else list(leaves)
        return ([o.detach() for o in outs] + [x.grad] + [leaf.grad for leaf in leaf_list]
                + [p.grad for p in cell.parameters()])

    _assert_same(run(fused), run(ref))
