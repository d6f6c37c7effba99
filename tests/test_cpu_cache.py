"""The CPU workspace cache (csrc/include/fused_rnn/workspace.h): large
per-call tensors keep their memory for the next call instead of giving it
back to the C library, up to FUSED_RNN_CPU_CACHE_MB."""

import os
import subprocess
import sys

import pytest
import torch

import fused_rnn

from helpers import module_classes

# LSTM, I = H = 64, B = 32, T = 40: the saved gates and their gradients are
# 1280 x 256 floats (1.25 MiB), past the cache's 256 KiB minimum.
T, B, H = 40, 32, 64

in_process = pytest.mark.skipif(
    fused_rnn.cpu_cache_info()["limit_bytes"] == 0,
    reason="FUSED_RNN_CPU_CACHE_MB=0 in this process: no cache to test (the subprocess "
    "tests below set the variable themselves)")


def _train_step(module):
    x = torch.randn(T, B, H, requires_grad=True)
    out, _ = module(x)
    out.sum().backward()
    return x.grad


@in_process
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


CACHE_CASES = [("LSTM", False, False), ("LSTM", True, False), ("LSTM", False, True),
               ("LSTM_PROJ", False, False), ("GRU", False, False), ("GRU", True, True),
               ("RNN_TANH", True, False), ("RNN_RELU", False, True)]


@in_process
@pytest.mark.parametrize("mode,packed,bidirectional", CACHE_CASES,
                         ids=[f"{m}-{'packed' if p else 'dense'}-{'bi' if b else 'uni'}"
                              for m, p, b in CACHE_CASES])
def test_cached_memory_gives_the_same_results(mode, packed, bidirectional):
    """Later steps run on memory the first one left (not zeroed, holding its
    values): the results must not depend on it, and must match torch.nn."""
    torch_cls, fused_cls, extra = module_classes(mode)
    kw = dict(extra, bidirectional=bidirectional)
    if mode == "LSTM_PROJ":
        kw["proj_size"] = 16
    torch.manual_seed(0)
    ref = torch_cls(H, H, **kw)
    fused = fused_cls(H, H, **kw)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H)
    lengths = torch.randint(T // 2, T + 1, (B,))
    lengths[0] = T

    def step(module):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        inp = (torch.nn.utils.rnn.pack_padded_sequence(xi, lengths, enforce_sorted=False)
               if packed else xi)
        out, hidden = module(inp)
        out = out.data if packed else out
        states = list(hidden) if isinstance(hidden, tuple) else [hidden]
        (out.sum() + sum(s.sum() for s in states)).backward()
        return [out, *states, xi.grad, *(p.grad for p in module.parameters())]

    fused_rnn.empty_cpu_cache()
    results = [step(fused) for _ in range(3)]
    assert fused_rnn.cpu_cache_info()["bytes"] > 0
    for later in results[1:]:
        for a, b in zip(later, results[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # (a sanity check in float32, sums over up to 2560 rows: the parity
    # files hold the exact rules)
    for a, b in zip(results[0], step(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


@in_process
def test_tensors_from_the_cache_are_ordinary():
    """An inference output comes from the cache (its memory goes back there
    when freed): it can be resized, viewed and shared like any tensor."""
    torch.manual_seed(0)
    lstm = fused_rnn.LSTM(H, H)
    with torch.no_grad():
        out, _ = lstm(torch.randn(T, B, H))
        fused_rnn.empty_cpu_cache()
        before = out.clone()
        out.resize_(2 * T, B, H)  # a larger storage, from the cache's allocator again
        torch.testing.assert_close(out[:T], before)
        del out  # its memory (and the resize's old block) to the cache
        assert fused_rnn.cpu_cache_info()["bytes"] >= 3 * T * B * H * 4
        out, _ = lstm(torch.randn(T, B, H))
        out.share_memory_()
        assert out.is_shared()


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


def test_bad_limit_in_the_environment_fails_a_call_that_takes_cached_memory():
    result = _run(STEP, "lots")
    assert result.returncode != 0
    assert "FUSED_RNN_CPU_CACHE_MB=lots" in result.stderr
