"""Every CUDA kernel of fused_rnn at small shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python bench/sanitize.py
    compute-sanitizer --tool racecheck python bench/sanitize.py

Each cell (LSTM, LSTM with projection, GRU, RNN tanh and relu), forward and
backward, in every dtype, on every kernel path (persistent where it fits,
stepwise, general, and general replayed from CUDA graphs), with batch 1 and 3 (both batch tiles of the persistent kernels),
hidden sizes below and above one unit per SM, forward and reverse, dense and
packed; and on the persistent and stepwise paths batch 12 at H=64, reverse
and packed: float32's TF32 tile (TF32 allowed, torch's default for
cuDNN's RNNs) and rows staged 16 bytes per load in every dtype but
float64. Prints one line per path and exits 0
when every result is finite."""

import sys

import torch

import fused_rnn
from fused_rnn import ops


def run_case(device, cell, dtype, B, H, reverse, packed, proj=0):
    gen = torch.Generator().manual_seed(0)
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[cell]
    T, I = 3, 5
    P = proj or H

    def r(*shape):
        return (torch.randn(*shape, generator=gen) * 0.3).to(device, dtype).requires_grad_()

    if packed:
        lengths = [T - min(i, T - 1) for i in range(B)]
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
        x = r(int(batch_sizes.sum()), I)
    else:
        batch_sizes = None
        x = r(T, B, I)
    hx, w_ih, w_hh, b_ih, b_hh = r(B, P), r(G * H, I), r(G * H, P), r(G * H), r(G * H)
    if cell == "lstm":
        w_hr = r(proj, H) if proj else None
        outs = ops.lstm(x, hx, r(B, H), w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    elif cell == "gru":
        outs = ops.gru(x, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)
    else:
        outs = ops.rnn(x, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse,
                       cell == "rnn_relu")
    outs = [o for o in outs if o is not None]
    grads = torch.autograd.grad(sum(o.float().sum() for o in outs), [x, hx, w_hh])
    return all(torch.isfinite(t.float()).all().item() for t in [*outs, *grads])


def main():
    # `python bench/sanitize.py cpu` runs the same cases on the CPU (a dry run
    # of this script on a machine without a GPU)
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    ok = True
    torch.backends.cudnn.allow_tf32 = True  # float32 past 8 sequences: the TF32 tile
    for path in ("persistent", "stepwise", "general", "graphed"):
        count = 0
        # graphed: the general path's loops captured into CUDA graphs at their
        # first call and replayed, on tensors of the cache's own
        kernel = "general" if path == "graphed" else path
        graphs = "always" if path == "graphed" else "off"
        with fused_rnn.kernel_path(kernel), fused_rnn.cuda_graphs(graphs):
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                for cell in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
                    shapes = [(1, 40, False, False), (3, 300, True, False),
                              (3, 17, False, True)]
                    if kernel != "general":  # the TF32 tile and 16-byte staging
                        shapes.append((12, 64, True, True))
                    for B, H, reverse, packed in shapes:
                        ok &= run_case(device, cell, dtype, B, H, reverse, packed)
                        count += 1
                ok &= run_case(device, "lstm", dtype, 3, 24, False, False, proj=5)
                count += 1
        if device != "cpu":
            torch.cuda.synchronize()
        print(f"sanitize: {path} path, {count} cases, finite: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
