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
