"""The CPU workspace cache (csrc/include/fused_rnn/workspace.h): large
per-call tensors keep their memory for the next call instead of giving it
back to the C library, up to FUSED_RNN_CPU_CACHE_MB."""

import os
import subprocess
import sys

import pytest
import torch

import fused_rnn

# LSTM, I = H = 64, B = 32, T = 40: the saved gates and their gradients are
# 1280 x 256 floats (1.25 MiB), past the cache's 256 KiB minimum.
T, B, H = 40, 32, 64


def _train_step(module):
    x = torch.randn(T, B, H, requires_grad=True)
    out, _ = module(x)
    out.sum().backward()
    return x.grad


def test_training_step_leaves_memory_in_the_cache_and_empty_returns_it():
    torch.manual_seed(0)
    lstm = fused_rnn.LSTM(H, H)
    fused_rnn.empty_cpu_cache()
    assert fused_rnn.cpu_cache_info()["bytes"] == 0
    _train_step(lstm)
    info = fused_rnn.cpu_cache_info()
    assert info["bytes"] >= T * B * 4 * H * 4, "the gates' memory should be kept"
    assert info["bytes"] <= info["limit_bytes"]
    fused_rnn.empty_cpu_cache()
    assert fused_rnn.cpu_cache_info()["bytes"] == 0


def test_cached_memory_gives_the_same_results():
    """A second step runs on memory the first one left (not zeroed, holding
    its values): the results must not depend on it."""
    torch.manual_seed(0)
    lstm = fused_rnn.LSTM(H, H)
    ref = torch.nn.LSTM(H, H)
    ref.load_state_dict(lstm.state_dict())
    x = torch.randn(T, B, H)
    fused_rnn.empty_cpu_cache()
    results = []
    for _ in range(3):
        lstm.zero_grad()
        xi = x.clone().requires_grad_()
        out, (h, c) = lstm(xi)
        (out.sum() + h.sum() + c.sum()).backward()
        results.append([out, h, c, xi.grad, *(p.grad for p in lstm.parameters())])
        assert fused_rnn.cpu_cache_info()["bytes"] > 0
    for later in results[1:]:
        for a, b in zip(later, results[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    out_ref, _ = ref(x)
    torch.testing.assert_close(results[0][0], out_ref)


def test_tensors_from_the_cache_are_ordinary():
    """An inference output comes from the cache: it can be resized, viewed,
    shared and freed like any tensor."""
    torch.manual_seed(0)
    lstm = fused_rnn.LSTM(H, H)
    with torch.no_grad():
        out, _ = lstm(torch.randn(T, B, H))
    before = out.clone()
    out.resize_(2 * T, B, H)  # a larger storage: the allocator's again
    torch.testing.assert_close(out[:T], before)
    out.share_memory_()
    assert out.is_shared()
    del out


def _run(code, env_value):
    env = {**os.environ, "FUSED_RNN_CPU_CACHE_MB": env_value}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


STEP = f"""
import torch, fused_rnn
torch.manual_seed(0)
lstm = fused_rnn.LSTM({H}, {H})
x = torch.randn({T}, {B}, {H}, requires_grad=True)
out, _ = lstm(x)
out.sum().backward()
print(fused_rnn.cpu_cache_info())
"""


@pytest.mark.parametrize("mb,expected_limit", [("0", 0), ("1", 1 << 20)])
def test_limit_from_the_environment(mb, expected_limit):
    result = _run(STEP, mb)
    assert result.returncode == 0, result.stderr
    info = eval(result.stdout.strip().splitlines()[-1])  # noqa: S307 (our own dict)
    assert info["limit_bytes"] == expected_limit
    assert 0 <= info["bytes"] <= expected_limit


def test_bad_limit_in_the_environment_fails_the_call():
    result = _run(STEP, "lots")
    assert result.returncode != 0
    assert "FUSED_RNN_CPU_CACHE_MB=lots" in result.stderr
