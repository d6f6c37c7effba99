"""The choice of CUDA kernels (fused_rnn.set_kernel_path and friends): its
API, its errors and the environment variable. What each path computes is
tested in test_cuda.py and test_cuda_persistent.py."""


import pytest
import torch

import fused_rnn
from helpers import python_lines


@pytest.fixture(autouse=True)
def _restore_path():
    previous = fused_rnn.get_kernel_path()
    yield
    fused_rnn.set_kernel_path(previous)


def test_default_is_auto():
    code = "import fused_rnn; print(fused_rnn.get_kernel_path())"
    assert python_lines(code, "FUSED_RNN_KERNEL_PATH") == ["auto"]


@pytest.mark.parametrize("path", ["auto", "persistent", "stepwise", "general"])
def test_set_and_get(path):
    fused_rnn.set_kernel_path(path)
    assert fused_rnn.get_kernel_path() == path
    assert torch.ops.fused_rnn.get_kernel_path() == path


def test_context_manager_restores_even_on_error():
    fused_rnn.set_kernel_path("general")
    with pytest.raises(RuntimeError, match="boom"):
        with fused_rnn.kernel_path("persistent"):
            assert fused_rnn.get_kernel_path() == "persistent"
            raise RuntimeError("boom")
    assert fused_rnn.get_kernel_path() == "general"


@pytest.mark.parametrize("bad", ["fast", "", "Persistent"])
def test_bad_path_value_error(bad):
    with pytest.raises(ValueError, match="auto, persistent, stepwise, general"):
        fused_rnn.set_kernel_path(bad)
    with pytest.raises(ValueError, match="auto, persistent, stepwise, general"):
        torch.ops.fused_rnn.set_kernel_path(bad)
    assert fused_rnn.get_kernel_path() in fused_rnn.paths.PATHS


@pytest.mark.parametrize("value", ["general", "persistent", "stepwise", "bogus"])
def test_environment_variable(value):
    code = ("import fused_rnn\n"
            "try:\n    print(fused_rnn.get_kernel_path())\n"
            "except ValueError as e:\n    print('ValueError', e)\n"
            "fused_rnn.set_kernel_path('general')\n"
            "print(fused_rnn.get_kernel_path())\n")
    out = python_lines(code, "FUSED_RNN_KERNEL_PATH", value)
    if value == "bogus":
        # A typo fails loudly, naming the variable, until a setter chooses.
        assert out[0].startswith("ValueError") and "FUSED_RNN_KERNEL_PATH=bogus" in out[0]
        assert "'bogus'" in out[0]
    else:
        assert out[0] == value
    assert out[1] == "general"


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("backward", [False, True])
def test_explain_on_cpu(cell, backward):
    for path in fused_rnn.paths.PATHS:
        with fused_rnn.kernel_path(path):
            text = fused_rnn.explain_kernel_path(cell, 256, 8, device="cpu", backward=backward)
        assert text.startswith("CPU sequence kernel")


def test_explain_bad_cell():
    with pytest.raises(ValueError, match="LSTM, GRU, RNN_TANH, RNN_RELU"):
        fused_rnn.explain_kernel_path("LSTMCell", 8, 1, device="cpu")
    with pytest.raises(ValueError, match="LSTM, GRU, RNN_TANH, RNN_RELU"):
        torch.ops.fused_rnn.kernel_path(torch.empty(0), "lstm", 8, 1, False, False, False)


@pytest.mark.parametrize("path", ["persistent", "stepwise", "general"])
def test_cpu_results_do_not_depend_on_the_choice(path):
    """The setting is for CUDA; on the CPU every setting gives bit-identical
    results (there is one CPU path)."""
    lstm = fused_rnn.LSTM(5, 7, num_layers=2, dtype=torch.float64)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    expected, _ = lstm(x)
    with fused_rnn.kernel_path(path):
        actual, _ = lstm(x)
    assert torch.equal(actual, expected)
