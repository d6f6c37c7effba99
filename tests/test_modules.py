"""Parity of the multi-layer modules (LSTM, LSTM with proj_size, GRU, RNN tanh,
RNN relu) with torch.nn: outputs, final states and the gradients of the input,
the initial states and every parameter, under a random upstream gradient.

float64: tight (1e-10). float32 / bfloat16: twice torch's own error against
torch.nn in float64 (see helpers.py)."""

import copy
import itertools

import pytest
import torch

from helpers import (
    DISCONTINUOUS_GRAD_REL,
    MODES,
    Cfg,
    assert_results_close,
    assert_twice_torch_error,
    check_module_parity,
    convert_inputs,
    is_discontinuous,
    make_cell_inputs,
    make_cell_twins,
    make_module_inputs,
    make_module_twins,
    max_abs,
    run_module,
)

# Each feature on its own and a few combinations; sizes include 1, odd sizes
# and batch 1. (mode is filled in per test.)
FEATURES = {
    "base": Cfg(),
    "no_hx": Cfg(hx=False),
    "layers2": Cfg(num_layers=2),
    "layers3_no_hx": Cfg(num_layers=3, hx=False, input_size=3, hidden_size=7),
    "no_bias": Cfg(bias=False, num_layers=2),
    "batch_first": Cfg(batch_first=True, num_layers=2),
    "bidirectional": Cfg(bidirectional=True),
    "bidir_l3_bf_nobias": Cfg(bidirectional=True, num_layers=3, batch_first=True, bias=False,
                              input_size=3, hidden_size=7, seq_len=7, batch=5),
    "batch1": Cfg(batch=1, seq_len=7, num_layers=2, bidirectional=True),
    "size1": Cfg(input_size=1, hidden_size=1, seq_len=1, batch=1),
    "size1_layers": Cfg(input_size=1, hidden_size=2, seq_len=3, batch=2, num_layers=2,
                        bidirectional=True),
    "hidden3": Cfg(input_size=17, hidden_size=3, seq_len=6, batch=4),
    "seq1": Cfg(seq_len=1, num_layers=2, bidirectional=True),
    "packed_sorted": Cfg(lengths=(5, 3, 3, 1), num_layers=2),
    "packed_unsorted_bidir": Cfg(lengths=(2, 5, 1, 4, 3), enforce_sorted=False, num_layers=2,
                                 bidirectional=True),
    "packed_equal": Cfg(lengths=(4, 4, 4), bidirectional=True),
    "packed_bf_nohx_nobias": Cfg(lengths=(3, 1, 4), enforce_sorted=False, batch_first=True,
                                 hx=False, bias=False, bidirectional=True, num_layers=2),
    "packed_len1": Cfg(lengths=(1,), bidirectional=True, num_layers=2),
    "packed_all_len1": Cfg(lengths=(1, 1, 1), enforce_sorted=False, bidirectional=True),
    "packed_l3": Cfg(lengths=(6, 2, 2, 1, 1), enforce_sorted=False, num_layers=3,
                     input_size=3, hidden_size=5),
    "unbatched": Cfg(unbatched=True, num_layers=2),
    "unbatched_bidir_no_hx": Cfg(unbatched=True, bidirectional=True, num_layers=2, hx=False),
    "unbatched_batch_first": Cfg(unbatched=True, batch_first=True, bidirectional=True),
}


def with_mode(cfg, mode):
    cfg = cfg.replace(mode=mode)
    if mode == "LSTM_PROJ" and cfg.hidden_size < 2:
        cfg = cfg.replace(hidden_size=2)  # proj_size must be < hidden_size
    return cfg


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("mode", MODES)
def test_parity_float64(mode, feature):
    check_module_parity(with_mode(FEATURES[feature], mode), torch.float64)


@pytest.mark.parametrize("proj_size", [1, 2, 6])
def test_lstm_proj_sizes_float64(proj_size):
    cfg = Cfg(mode="LSTM_PROJ", proj_size=proj_size, hidden_size=7, input_size=5,
              num_layers=2, bidirectional=True, lengths=(4, 2, 3), enforce_sorted=False)
    check_module_parity(cfg, torch.float64)


F32_FEATURES = ["base", "bidir_l3_bf_nobias", "packed_unsorted_bidir", "unbatched", "batch1",
                "no_hx"]

@pytest.mark.parametrize("feature", F32_FEATURES)
@pytest.mark.parametrize("mode", MODES)
def test_parity_float32(mode, feature):
    check_module_parity(with_mode(FEATURES[feature], mode), torch.float32)


# The sizes the project is for (DESIGN.md: batch 1-8, hidden 256-1024): long
# dot products (the recurrent GEMMs of backward sum over G*H terms).
LARGE = {
    "hidden256_batch8": Cfg(input_size=32, hidden_size=256, seq_len=4, batch=8),
    "hidden512_batch2": Cfg(input_size=16, hidden_size=512, seq_len=3, batch=2),
    "hidden1024_batch1": Cfg(input_size=16, hidden_size=1024, seq_len=3, batch=1),
    "hidden1024_packed_bidir": Cfg(input_size=16, hidden_size=1024, lengths=(3, 1),
                                   bidirectional=True),
    "batch64_hidden64": Cfg(input_size=8, hidden_size=64, seq_len=4, batch=64,
                            bidirectional=True),
    "long_seq64": Cfg(input_size=5, hidden_size=9, seq_len=64, batch=3, num_layers=2),
}


@pytest.mark.parametrize("case", list(LARGE))
@pytest.mark.parametrize("mode", MODES)
def test_parity_float32_large_hidden(mode, case):
    check_module_parity(with_mode(LARGE[case], mode), torch.float32)


@pytest.mark.parametrize("case", ["hidden256_batch8", "hidden1024_packed_bidir"])
@pytest.mark.parametrize("mode", MODES)
def test_parity_float64_large_hidden(mode, case):
    check_module_parity(with_mode(LARGE[case], mode), torch.float64)


BF16_CASES = {
    "small": Cfg(input_size=3, hidden_size=5, seq_len=4, batch=2),
    "packed_bidir_l2": Cfg(input_size=3, hidden_size=5, lengths=(3, 1, 2), enforce_sorted=False,
                           bidirectional=True, num_layers=2),
    "hidden64_bidir": Cfg(input_size=16, hidden_size=64, seq_len=4, batch=4, bidirectional=True),
}


@pytest.mark.parametrize("case", list(BF16_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_parity_bfloat16(mode, case):
    check_module_parity(with_mode(BF16_CASES[case], mode), torch.bfloat16)


@pytest.mark.parametrize("mode", MODES)
def test_parity_float16(mode):
    check_module_parity(Cfg(mode=mode, input_size=3, hidden_size=5, seq_len=4, batch=2,
                            num_layers=2), torch.float16)


# --------------------------------------------------------------------------
# proj_size folded: the recurrence on o * tanh(c) with weight_hh @ weight_hr,
# the projection after it (lstm.cpp's fold_projection; on CUDA where that
# recurrence takes the persistent or stepwise kernels), forced on the CPU,
# where the per-step loop stands in for those kernels.
@pytest.fixture
def folded(monkeypatch):
    monkeypatch.setenv("FUSED_RNN_PROJECTION", "fold")


def recorded_ranges(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("setting, folds", [(None, False), ("auto", False), ("steps", False),
                                             ("fold", True)])
def test_projection_setting(monkeypatch, setting, folds):
    """FUSED_RNN_PROJECTION, read at every call: auto (the default; on the
    CPU per step), steps, fold; the folded forward and backward show their
    ranges in the profiler. Any other value raises a ValueError naming it."""
    if setting is not None:
        monkeypatch.setenv("FUSED_RNN_PROJECTION", setting)
    cfg = Cfg(mode="LSTM_PROJ", proj_size=2, hidden_size=5)
    _, fused = make_module_twins(cfg, torch.float64)
    x = make_module_inputs(cfg, torch.float64)["x"].requires_grad_()
    names = recorded_ranges(lambda: fused(x)[0].sum().backward())
    assert ("fused_rnn::fold_projection" in names) == folds
    assert ("fused_rnn::projection_backward" in names) == folds
    monkeypatch.setenv("FUSED_RNN_PROJECTION", "folded")
    with pytest.raises(ValueError, match="FUSED_RNN_PROJECTION=folded"):
        fused(x)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_projection_folded_float64(folded, feature):
    check_module_parity(with_mode(FEATURES[feature], "LSTM_PROJ"), torch.float64)


@pytest.mark.parametrize("proj_size", [1, 2, 6])
def test_projection_folded_sizes_float64(folded, proj_size):
    test_lstm_proj_sizes_float64(proj_size)


@pytest.mark.parametrize("case", ["base", "bidir_l3_bf_nobias", "packed_unsorted_bidir",
                                  "hidden256_batch8", "hidden1024_packed_bidir", "long_seq64"])
def test_projection_folded_float32(folded, case):
    check_module_parity(with_mode({**FEATURES, **LARGE}[case], "LSTM_PROJ"), torch.float32)


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_projection_folded_bfloat16(folded, case):
    check_module_parity(with_mode(BF16_CASES[case], "LSTM_PROJ"), torch.bfloat16)


def test_projection_folded_float16(folded):
    check_module_parity(Cfg(mode="LSTM_PROJ", input_size=3, hidden_size=5, seq_len=4, batch=2,
                            num_layers=2), torch.float16)


# --------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------

DROPOUT_CASES = {
    "l3_bidir": Cfg(num_layers=3, bidirectional=True, dropout=0.4, input_size=5, hidden_size=7),
    "l2_packed_unsorted": Cfg(num_layers=2, dropout=0.5, lengths=(3, 5, 1, 4),
                              enforce_sorted=False, bidirectional=True, batch_first=True),
    "l2_unbatched_no_hx": Cfg(num_layers=2, dropout=0.3, unbatched=True, hx=False),
    "l1": Cfg(num_layers=1, dropout=0.5),  # torch warns and applies nothing
}


def _dropout_run(module, inputs, cfg, seed, **kw):
    res = run_module(module, inputs, enforce_sorted=cfg.enforce_sorted, dropout_seed=seed, **kw)
    # the RNG must be left where torch.nn leaves it: the same draws, no more
    res["rng_after"] = torch.rand(4, dtype=torch.float64)
    return res


@pytest.mark.parametrize("case", list(DROPOUT_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_dropout_training_same_seed_float64(mode, case):
    cfg = with_mode(DROPOUT_CASES[case], mode)
    ref, fused = make_module_twins(cfg, torch.float64)
    ref.train()
    fused.train()
    inputs = make_module_inputs(cfg, torch.float64)
    for seed in (3, 11):
        expected = _dropout_run(ref, inputs, cfg, seed)
        actual = _dropout_run(fused, inputs, cfg, seed)
        assert_results_close(actual, expected, what=f"{cfg} dropout seed {seed}")
    if cfg.num_layers > 1:
        # the test can fail: dropout really changes the output here
        other = _dropout_run(fused, inputs, cfg, 12345)
        assert not torch.allclose(other["output"], actual["output"])
        fused.eval()
        evaluated = run_module(fused, inputs, enforce_sorted=cfg.enforce_sorted)
        assert not torch.allclose(evaluated["output"], actual["output"])


@pytest.mark.parametrize("mode", MODES)
def test_dropout_training_same_seed_float32(mode):
    cfg = with_mode(DROPOUT_CASES["l3_bidir"], mode)
    ref, fused = make_module_twins(cfg, torch.float32)
    ref.train()
    fused.train()
    ref64 = copy.deepcopy(ref).double()
    inputs = make_module_inputs(cfg, torch.float32, round_dtype=torch.float32)
    r64 = _dropout_run(ref64, convert_inputs(inputs, torch.float64), cfg, 5,
                       round_dtype=torch.float32)
    low = _dropout_run(ref, inputs, cfg, 5, round_dtype=torch.float32)
    act = _dropout_run(fused, inputs, cfg, 5, round_dtype=torch.float32)
    for res in (r64, low, act):
        res["rng_after"] = res["rng_after"].float()
    assert_twice_torch_error(act, low, r64, what=f"{cfg} dropout float32")


@pytest.mark.parametrize("mode", MODES)
def test_eval_ignores_dropout(mode):
    cfg = with_mode(DROPOUT_CASES["l3_bidir"], mode)
    ref, fused = make_module_twins(cfg, torch.float64)
    ref.eval()
    fused.eval()
    inputs = make_module_inputs(cfg, torch.float64)
    expected = _dropout_run(ref, inputs, cfg, 7)
    actual = _dropout_run(fused, inputs, cfg, 7)
    assert_results_close(actual, expected, what=f"{cfg} eval")
    # and the same as a twin without dropout
    nodrop = copy.deepcopy(fused)
    nodrop.dropout = 0.0
    nodrop.train()
    plain = run_module(nodrop, inputs)
    assert_results_close({"output": actual["output"]}, {"output": plain["output"]},
                         what="eval with dropout vs no dropout")


@pytest.mark.parametrize("mode", MODES)
def test_no_grad_inference_matches(mode):
    """Under no_grad (the train=False kernels) outputs equal torch.nn's and
    the grad-mode outputs."""
    cfg = with_mode(FEATURES["packed_unsorted_bidir"], mode)
    ref, fused = make_module_twins(cfg, torch.float64)
    inputs = make_module_inputs(cfg, torch.float64)
    with torch.no_grad():
        expected = run_module(ref, inputs, enforce_sorted=False, backward=False)
        actual = run_module(fused, inputs, enforce_sorted=False, backward=False)
    assert_results_close(actual, expected, what=f"{cfg} no_grad")
    graded = run_module(fused, inputs, enforce_sorted=False, backward=False)
    assert_results_close(actual, graded, what=f"{cfg} no_grad vs grad mode")


@pytest.mark.parametrize("mode", MODES)
def test_inference_mode_matches(mode):
    cfg = with_mode(FEATURES["bidirectional"], mode)
    ref, fused = make_module_twins(cfg, torch.float32)
    inputs = make_module_inputs(cfg, torch.float32)
    with torch.inference_mode():
        expected = run_module(ref, inputs, backward=False)
        actual = run_module(fused, inputs, backward=False)
    assert_results_close(actual, expected, atol=1e-5, rtol=1e-5, what=f"{cfg} inference_mode")


@pytest.mark.parametrize("mode", MODES)
def test_only_some_inputs_require_grad(mode):
    """Frozen parameters and an input without grad: the remaining gradients
    still match torch.nn."""
    cfg = with_mode(Cfg(num_layers=2, bidirectional=True), mode)
    ref, fused = make_module_twins(cfg, torch.float64)
    for m in (ref, fused):
        m.weight_ih_l0.requires_grad_(False)
        m.bias_hh_l1_reverse.requires_grad_(False)
    inputs = make_module_inputs(cfg, torch.float64)
    res = {}
    for name, m in (("torch", ref), ("fused", fused)):
        hx = inputs["hx"]
        hx = tuple(h.clone().requires_grad_() for h in hx) if isinstance(hx, tuple) \
            else hx.clone().requires_grad_()
        out, state = m(inputs["x"], hx)
        states = list(state) if isinstance(state, tuple) else [state]
        loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum()
                   for t in [out] + states)
        loss.backward()
        r = {"output": out.detach()}
        hxs = hx if isinstance(hx, tuple) else (hx,)
        for i, h in enumerate(hxs):
            r[f"grad_hx{i}"] = h.grad
        for n, p in m.named_parameters():
            r["grad_" + n] = p.grad
        res[name] = r
    assert res["fused"]["grad_weight_ih_l0"] is None
    assert_results_close(res["fused"], res["torch"], what=f"{cfg} partial requires_grad")


# --------------------------------------------------------------------------
# gradcheck of whole modules (float64, small): input, initial states and
# every parameter (through torch.func.functional_call)
# --------------------------------------------------------------------------

GRADCHECK_CASES = {
    "dense_bidir_l2": Cfg(num_layers=2, bidirectional=True, input_size=2, hidden_size=3,
                          seq_len=3, batch=2),
    "packed_unsorted_bidir": Cfg(bidirectional=True, input_size=2, hidden_size=3,
                                 lengths=(2, 3, 1), enforce_sorted=False),
    "unbatched_bf_no_bias": Cfg(unbatched=True, batch_first=True, bias=False, num_layers=2,
                                input_size=2, hidden_size=3, seq_len=3),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_module(mode, case):
    cfg = GRADCHECK_CASES[case].replace(mode=mode)
    if mode == "LSTM_PROJ":
        cfg = cfg.replace(proj_size=2)
    gradcheck_module(cfg)


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_projection_folded(folded, case):
    gradcheck_module(GRADCHECK_CASES[case].replace(mode="LSTM_PROJ", proj_size=2))


def gradcheck_module(cfg):
    _, fused = make_module_twins(cfg, torch.float64)
    inputs = make_module_inputs(cfg, torch.float64)
    names = [n for n, _ in fused.named_parameters()]
    hx = inputs["hx"]
    hx = list(hx) if isinstance(hx, tuple) else [hx]
    leaves = [inputs["x"]] + hx + [p.detach() for p in fused.parameters()]
    leaves = [t.clone().requires_grad_() for t in leaves]
    n_hx = len(hx)

    def fn(x, *rest):
        states, params = rest[:n_hx], rest[n_hx:]
        inp = x
        if cfg.lengths is not None:
            inp = torch.nn.utils.rnn.pack_padded_sequence(
                x, torch.tensor(cfg.lengths), batch_first=cfg.batch_first,
                enforce_sorted=cfg.enforce_sorted)
        h = tuple(states) if n_hx == 2 else states[0]
        out, state = torch.func.functional_call(fused, dict(zip(names, params)), (inp, h))
        if cfg.lengths is not None:
            out = out.data
        return (out,) + (tuple(state) if isinstance(state, tuple) else (state,))

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell", "RNNCell_TANH", "RNNCell_RELU"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_cell(mode, bias):
    _, cell = make_cell_twins(mode, 3, 4, bias=bias, dtype=torch.float64)
    inputs = make_cell_inputs(mode, 3, 4, 2)
    names = [n for n, _ in cell.named_parameters()]
    hx = inputs["hx"]
    hx = list(hx) if isinstance(hx, tuple) else [hx]
    leaves = [t.clone().requires_grad_()
              for t in [inputs["x"]] + hx + [p.detach() for p in cell.parameters()]]
    n_hx = len(hx)

    def fn(x, *rest):
        states, params = rest[:n_hx], rest[n_hx:]
        h = tuple(states) if n_hx == 2 else states[0]
        return torch.func.functional_call(cell, dict(zip(names, params)), (x, h))

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------
# autocast (CPU, bfloat16): what torch.nn does under autocast, fused does
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mode,packed", [(m, False) for m in MODES + ("LSTMCell", "GRUCell",
                                                                      "RNNCell_TANH")]
                         + [(m, True) for m in MODES])
def test_autocast_cpu_bfloat16(mode, packed):
    """Under torch.autocast("cpu", bfloat16) with float32 weights the fused
    module runs (no dtype error), returns torch.nn's output dtypes (which
    differ for a PackedSequence: torch.nn's LSTM then returns float32),
    values within bfloat16 accuracy, and float32 gradients of every
    parameter, the input and the initial states."""
    if mode in MODES:
        cfg = Cfg(mode=mode, num_layers=2, input_size=5, hidden_size=7,
                  lengths=(5, 4, 2) if packed else None)
        ref, fused = make_module_twins(cfg, torch.float32)
        inputs = make_module_inputs(cfg, torch.float32)
    else:
        ref, fused = make_cell_twins(mode, 5, 7, dtype=torch.float32)
        inputs = make_cell_inputs(mode, 5, 7, 3, dtype=torch.float32)
    results = {}
    for name, m in (("torch", ref), ("fused", fused)):
        # Fresh leaves per run: the input and initial states get gradients too.
        x = inputs["x"].detach().clone().requires_grad_()
        hx = torch.utils._pytree.tree_map(lambda t: t.detach().clone().requires_grad_(),
                                          inputs["hx"])
        leaves = [x] + torch.utils._pytree.tree_leaves(hx)
        x_in = (torch.nn.utils.rnn.pack_padded_sequence(x, inputs["lengths"],
                                                        batch_first=cfg.batch_first)
                if packed else x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x_in, hx)
        flat = [t for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.is_floating_point()]
        sum(t.float().sum() for t in flat).backward()
        grads = {n: p.grad for n, p in m.named_parameters()}
        grads.update({f"leaf{i}": t.grad for i, t in enumerate(leaves)})
        results[name] = (flat, grads)
    (t_out, t_grads), (f_out, f_grads) = results["torch"], results["fused"]
    assert [t.dtype for t in f_out] == [t.dtype for t in t_out]
    for a, b in zip(f_out, t_out):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2 * max(1.0, max_abs(b)),
                                   rtol=3e-2)
    for n, g in t_grads.items():
        assert f_grads[n] is not None and f_grads[n].dtype == torch.float32, n
        if is_discontinuous(mode, torch.bfloat16) or mode == "RNNCell_RELU":
            # A unit within one bfloat16 rounding of 0 switches on or off in
            # either implementation (see helpers.DISCONTINUOUS_GRAD_REL).
            error = (f_grads[n] - g).norm().item()
            assert error <= DISCONTINUOUS_GRAD_REL * g.norm().item() + 1e-6, (n, error)
            continue
        torch.testing.assert_close(f_grads[n], g, atol=5e-2 * max(1.0, max_abs(g)), rtol=5e-2)


AUTOCAST_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


@pytest.mark.parametrize("mode,packed", [(m, False) for m in MODES + ("LSTMCell", "GRUCell",
                                                                      "RNNCell_TANH")]
                         + [(m, True) for m in MODES])
def test_autocast_cpu_result_dtypes_follow_the_states(mode, packed):
    """Under CPU bfloat16 autocast torch.nn's results take the dtype of the
    state their elementwise math mixes with (GRU's h, LSTM's c), the input's
    where none is given: an input from an autocast layer (bfloat16) with a
    float32 state gives float32. Every mix of input, h and c dtypes gives
    torch.nn's dtypes and values (within bfloat16 accuracy)."""
    cell = mode not in MODES
    lstm = mode.startswith("LSTM")
    names = list(AUTOCAST_DTYPES)
    for x_name, h_name, c_name in itertools.product(names, names + [None], names):
        if (h_name is None or not lstm) and c_name != "f32":
            continue
        if cell:
            ref, fused = make_cell_twins(mode, 5, 7, dtype=torch.float32)
            inputs = make_cell_inputs(mode, 5, 7, 3, dtype=torch.float32)
        else:
            cfg = Cfg(mode=mode, input_size=5, hidden_size=7,
                      lengths=(5, 4, 2) if packed else None)
            ref, fused = make_module_twins(cfg, torch.float32)
            inputs = make_module_inputs(cfg, torch.float32)
        x = inputs["x"].to(AUTOCAST_DTYPES[x_name])
        hx = inputs["hx"]
        if h_name is None:
            hx = None
        elif lstm:
            hx = (hx[0].to(AUTOCAST_DTYPES[h_name]), hx[1].to(AUTOCAST_DTYPES[c_name]))
        else:
            hx = hx.to(AUTOCAST_DTYPES[h_name])
        if packed:
            x = torch.nn.utils.rnn.pack_padded_sequence(x, inputs["lengths"])
        results = []
        for m in (ref, fused):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x, hx)
            results.append([t for t in torch.utils._pytree.tree_leaves(out)
                             if isinstance(t, torch.Tensor) and t.is_floating_point()])
        case = (mode, x_name, h_name, c_name)
        assert [t.dtype for t in results[1]] == [t.dtype for t in results[0]], case
        for a, b in zip(results[1], results[0]):
            torch.testing.assert_close(a.float(), b.float(), atol=3e-2 * max(1.0, max_abs(b)),
                                       rtol=3e-2, msg=str(case))


# --------------------------------------------------------------------------
# Non-contiguous inputs, states and parameters
# --------------------------------------------------------------------------

def _strided(t):
    """The same values in a non-contiguous tensor (every other element of a
    twice-as-wide buffer)."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    buf[..., ::2] = t
    view = buf[..., ::2]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("what", ["input", "states", "input_transposed", "weights"])
def test_non_contiguous(mode, what):
    cfg = Cfg(mode=mode, num_layers=2, bidirectional=True, input_size=5, hidden_size=7)
    ref, fused = make_module_twins(cfg, torch.float64)
    inputs = make_module_inputs(cfg, torch.float64)
    expected = run_module(ref, inputs)
    if what == "input":
        inputs = dict(inputs, x=_strided(inputs["x"]))
    elif what == "input_transposed":
        # (T, B, I) values stored batch-major
        inputs = dict(inputs, x=inputs["x"].transpose(0, 1).contiguous().transpose(0, 1))
    elif what == "states":
        hx = inputs["hx"]
        hx = tuple(_strided(h) for h in hx) if isinstance(hx, tuple) else _strided(hx)
        inputs = dict(inputs, hx=hx)
    else:
        with torch.no_grad():
            for name, p in list(fused.named_parameters()):
                if p.dim() == 2:
                    # the same values, stored transposed
                    setattr(fused, name, torch.nn.Parameter(p.t().contiguous().t()))
        assert not fused.weight_hh_l0.is_contiguous()
    actual = run_module(fused, inputs)
    assert_results_close(actual, expected, what=f"{cfg} non-contiguous {what}")


@pytest.mark.parametrize("mode", MODES)
def test_frozen_module_input_grad_only(mode):
    """All parameters frozen (e.g. attacking a trained model): the input and
    state gradients still match torch.nn."""
    cfg = Cfg(mode=mode, num_layers=2, bidirectional=True, lengths=(4, 2, 3),
              enforce_sorted=False)
    ref, fused = make_module_twins(cfg, torch.float64)
    for m in (ref, fused):
        m.requires_grad_(False)
    inputs = make_module_inputs(cfg, torch.float64)
    assert_results_close(run_module(fused, inputs, enforce_sorted=False),
                         run_module(ref, inputs, enforce_sorted=False),
                         what=f"{cfg} frozen")


@pytest.mark.parametrize("feature", ["base", "batch_first", "layers2", "packed_sorted",
                                     "unbatched"])
@pytest.mark.parametrize("mode", MODES)
def test_output_and_input_changed_in_place_after_the_call(mode, feature):
    """What a model may do after an RNN under torch.nn's composite CPU
    path: change the output in place (out += skip, ReLU(inplace=True)) and,
    batch-first, the input, before backward. The gradients match torch.nn's
    (the op keeps its own output and input for backward, not the caller's)."""
    cfg = with_mode(FEATURES[feature], mode)
    ref, fused = make_module_twins(cfg, torch.float64)
    grads = []
    for module in (ref, fused):
        x = make_module_inputs(cfg, torch.float64)["x"].requires_grad_()
        source = x * 1
        if cfg.lengths is not None:
            packed = torch.nn.utils.rnn.pack_padded_sequence(source, list(cfg.lengths),
                                                             batch_first=cfg.batch_first)
            out = module(packed)[0].data
        else:
            out = module(source)[0]
        if cfg.batch_first:
            source.mul_(2)
        out += torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
        torch.nn.functional.relu(out, inplace=True)
        out.pow(2).sum().backward()
        grads.append([x.grad] + [p.grad for p in module.parameters()])
    for index, (actual, expected) in enumerate(zip(*grads)):
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10, msg=str(index))
