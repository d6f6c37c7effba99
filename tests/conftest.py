"""pytest configuration shared by the whole suite. The test machinery itself
lives in helpers.py (imported by the test files)."""

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    from hypothesis import settings

    # no example database: the suite writes nothing into the repository
    settings.register_profile("fused_rnn", deadline=None, database=None, print_blob=True)
    settings.load_profile("fused_rnn")
except ImportError:  # pragma: no cover - hypothesis is a test requirement
    pass


@pytest.fixture(autouse=True)
def _seed_and_warnings():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # torch.nn warns on dropout > 0 with one layer; both twins do
        warnings.filterwarnings("ignore", message="dropout option adds dropout")
        yield


@pytest.fixture(scope="session")
def emu():
    """The persistent CUDA kernels' source (and the plan of their launches)
    compiled for the CPU emulation (tests/emulation/): torch.ops.fused_rnn_emu."""
    from torch.utils import cpp_extension

    from helpers import EMULATION_CHUNK, extension_build_dir

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    emulation = os.path.join(root, "tests", "emulation")
    sources = [os.path.join(emulation, f) for f in ("persistent_emu.cpp", "cuda_emu.h",
                                                    "cooperative_groups.h")] + [
        os.path.join(root, "csrc", "cuda", "persistent.cuh"),
        os.path.join(root, "csrc", "cuda", "persistent_plan.h"),
        os.path.join(root, "csrc", "include", "fused_rnn", "cells.h"),
        os.path.join(root, "csrc", "include", "fused_rnn", "activations.h"),
        os.path.join(root, "csrc", "include", "fused_rnn", "persistent.h"),
        os.path.join(root, "csrc", "include", "fused_rnn", "graphs.h"),
    ]
    build = extension_build_dir("fused_rnn_emu", sources)
    cpp_extension.load(
        name="fused_rnn_emu", sources=[sources[0]], build_directory=build,
        extra_include_paths=[os.path.join(root, "csrc", "include"), emulation],
        extra_cflags=["-DFUSED_RNN_EMULATION", f"-DFUSED_RNN_EMULATION_CHUNK={EMULATION_CHUNK}",
                      "-O1", "-Wno-unknown-pragmas", "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0"],
        is_python_module=False, verbose=False)
    return torch.ops.fused_rnn_emu
