"""The CPU kernels' branch-free float -> bfloat16 rounding
(csrc/include/fused_rnn/cpu_convert.h) gives c10's bits for every upper
half of a float, at the rounding edges of the lower half (ties to even
both ways, just below and above), zeros, infinities and NaNs."""

import os

import pytest
import torch
from torch.utils import cpp_extension

from helpers import extension_build_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def convert():
    sources = [os.path.join(ROOT, "tests", "cpp", "convert_check.cpp"),
               os.path.join(ROOT, "csrc", "include", "fused_rnn", "cpu_convert.h")]
    build = extension_build_dir("fused_rnn_convert", sources)
    cpp_extension.load(
        name="fused_rnn_convert", sources=[sources[0]],
        build_directory=build, extra_include_paths=[os.path.join(ROOT, "csrc", "include")],
        extra_cflags=["-O2"], is_python_module=False, verbose=False)
    return torch.ops.fused_rnn_convert.to_bfloat16


def test_same_bits_as_c10(convert):
    high = torch.arange(1 << 16, dtype=torch.int64) << 16
    low = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    bits = (high[:, None] | low[None, :]).flatten()
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    x = bits.view(torch.float32)
    ours = convert(x).view(torch.int16)
    # c10::BFloat16's own conversion, element by element (not ATen's
    # vectorised copy kernel, which could differ on NaN payloads).
    theirs = torch.tensor([torch.tensor(v, dtype=torch.bfloat16).view(torch.int16).item()
                           for v in x[::997].tolist()], dtype=torch.int16)
    assert torch.equal(ours[::997], theirs)
    # All of them against ATen's conversion, NaNs aside (both give a NaN).
    aten = x.to(torch.bfloat16).view(torch.int16)
    nan = torch.isnan(x)
    assert torch.equal(ours[~nan], aten[~nan])
    assert torch.isnan(convert(x[nan]).float()).all()
