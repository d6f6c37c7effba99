"""The CPU kernels' float activations are our own branch-free polynomials
(csrc/include/fused_rnn/activations.h). Measure them through the RNN op
(identity input weights, zero recurrence, no bias: output = act(x)) against
float64 on a dense sweep of the float range, in units in the last place."""

import torch

import fused_rnn  # noqa: F401


def _ulp_error(ours, reference):
    spacing = torch.abs(torch.nextafter(reference.float(), torch.tensor(float("inf"))) - reference.float())
    return ((ours.double() - reference) / spacing.double().clamp_min(torch.finfo(torch.float32).tiny)).abs()


def _apply(x, relu=False):
    """act(x) for a 1-D float tensor x through fused_rnn::rnn_forward."""
    n = x.numel()
    eye = torch.ones(1, 1)
    zero = torch.zeros(1, 1)
    out, _ = torch.ops.fused_rnn.rnn_forward(
        x.view(1, n, 1), torch.zeros(n, 1), eye, zero, None, None, None, False, relu
    )
    return out.view(n)


def test_tanh_float32_within_2_ulp():
    x = torch.cat([
        torch.linspace(-12, 12, 200_001),
        torch.linspace(-0.7, 0.7, 100_001),
        torch.logspace(-30, 1.5, 50_001),
        -torch.logspace(-30, 1.5, 50_001),
        torch.tensor([0.0, -0.0, 0.625, -0.625, 44.0, 88.0, 1e30, -1e30]),
    ]).float()
    ours = _apply(x)
    reference = torch.tanh(x.double())
    assert _ulp_error(ours, reference).max() <= 2.0
    assert torch.equal(_apply(torch.tensor([float("inf"), float("-inf")])), torch.tensor([1.0, -1.0]))
    assert torch.isnan(_apply(torch.tensor([float("nan")]))).all()


def test_sigmoid_float32_accuracy():
    """sigmoid and tanh as the LSTM op applies them: with one hidden unit,
    identity input weights and no recurrence, the training workspace holds
    the activated gates i, f, g, o of every x."""
    x = torch.linspace(-90, 90, 400_001).float()
    n = x.numel()
    w_ih = torch.ones(4, 1)
    out = torch.ops.fused_rnn.lstm_forward(
        x.view(1, n, 1), torch.zeros(n, 1), torch.zeros(n, 1), w_ih, torch.zeros(4, 1),
        None, None, None, None, False, True,
    )
    gates = out[3].view(n, 4)
    reference = torch.sigmoid(x.double())
    # i, f, o are sigmoids; absolute error against float64 (values in [0, 1]).
    for column in (0, 1, 3):
        assert (gates[:, column].double() - reference).abs().max() <= 2 * 2.0**-24
    assert _ulp_error(gates[:, 2], torch.tanh(x.double())).max() <= 2.0


def test_relu_passes_nan_and_zeroes_negatives():
    x = torch.tensor([-3.0, -0.0, 0.0, 2.5, float("nan"), float("inf")])
    y = _apply(x, relu=True)
    assert torch.equal(y[:4], torch.tensor([0.0, 0.0, 0.0, 2.5]))
    assert torch.isnan(y[4]) and y[5] == float("inf")
