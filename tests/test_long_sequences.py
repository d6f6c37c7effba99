"""Long sequences in inference: the CPU computes the input projections a
block of steps at a time into a reused buffer (csrc/sequence/sequence.h,
InputProjection). Sequences spanning several blocks, dense and packed, both
directions, must match torch.nn exactly in float64."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("packed", [False, True])
def test_many_projection_blocks_match_torch(mode, packed):
    torch.manual_seed(0)
    # 2^19-element blocks: 128 steps for LSTM (B * 4H = 16 * 256), 170 for
    # GRU, 512 for RNN, so 600 steps span several of each.
    reference = getattr(torch.nn, mode)(5, 64, dtype=torch.float64, bidirectional=True)
    fused = getattr(fused_rnn, mode)(5, 64, dtype=torch.float64, bidirectional=True)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(600, 16, 5, dtype=torch.float64)
    if packed:
        lengths = torch.tensor([600, 1, 599, 128, 129, 513, 30, 512, 170, 171, 341, 2, 600, 300, 511, 77])
        x = pack_padded_sequence(x, lengths, enforce_sorted=False)
    with torch.no_grad():
        out_ref, state_ref = reference(x)
        out, state = fused(x)
    if packed:
        out_ref, out = out_ref.data, out.data
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=0)
    for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(state_ref)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
