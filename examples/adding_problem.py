"""The adding problem (Hochreiter & Schmidhuber, 1997): a long-range memory
task on which a vanilla RNN fails and gated cells (LSTM, GRU) succeed.

Each input is a sequence of T (value, marker) pairs: the values are uniform
in [0, 1], the marker is 1 at exactly two steps (one in each half of the
sequence) and 0 elsewhere. The target, read from the last step only
(many-to-one regression), is the sum of the two marked values. Predicting the
mean, 1.0, whatever the input gives MSE = Var(U1 + U2) = 2/12 = 0.167; a model
beats that baseline only by carrying the first marked value across ~T/2 steps.

Each cell (RNN with tanh, LSTM, GRU) is trained twice from the same initial
weights on the same batches: with fused_rnn's module and with torch.nn's. The
held-out MSE of the two twins should agree; the vanilla RNN should stay at
(or above) the 0.167 baseline while LSTM and GRU end far below it.

The LSTM and GRU twins end up with nearly the same MSE. The vanilla RNN
twins do not: its training is chaotic (gradients explode now and then), so
float rounding differences of ~1e-7 between the kernels grow into different
runs, both of which fail.

Defaults: T = 50, not the classic 100. On 2 CPU cores LSTM needs ~800 or
more Adam steps to leave the 0.167 plateau at T = 100 (20-30 s per LSTM run,
minutes for the six runs); at T = 50 it escapes in ~400-600 steps, within
the time budget. `--seq-len 100 --steps 1500` runs the classic setting
(~3 min on 2 cores; LSTM and GRU reach MSE < 1e-3). lr is 2e-2: at 1e-2
LSTM's escape at T = 50 is a coin toss within 600 steps on some seeds. The
LSTM's forget-gate bias starts at 1 (Gers et al. 2000; Jozefowicz et al.
2015), which makes that escape earlier.

    python examples/adding_problem.py                  # ~25-35 s on 2 cores
    python examples/adding_problem.py --cells LSTM --seq-len 100 --steps 1500
"""

import torch
from torch import nn

import common


class Regressor(nn.Module):
    """One recurrent layer read at its last step, then a linear head.
    `backend` is fused_rnn or torch.nn; `cell` is "RNN", "LSTM" or "GRU"."""

    def __init__(self, backend, cell, hidden_size):
        super().__init__()
        # RNN's default nonlinearity is tanh: the classic vanilla RNN
        self.rnn = getattr(backend, cell)(2, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        if cell == "LSTM":
            # gates are (input, forget, cell, output) in torch's layout; a
            # positive forget bias makes the cell remember by default
            with torch.no_grad():
                self.rnn.bias_hh_l0[hidden_size:2 * hidden_size].fill_(1.0)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def adding_batch(generator, batch_size, seq_len):
    """(inputs [B, T, 2], targets [B]) of the adding problem."""
    values = torch.rand(batch_size, seq_len, generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (batch_size,), generator=generator)
    second = torch.randint(half, seq_len, (batch_size,), generator=generator)
    markers = torch.zeros(batch_size, seq_len)
    rows = torch.arange(batch_size)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return torch.stack([values, markers], dim=-1), (values * markers).sum(dim=1)


def train(model, args, test_x, test_y):
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = common.data_generator(args.seed)
    timer = common.StepTimer(args.device)
    losses = []
    for _ in range(args.steps):
        x, y = adding_batch(generator, args.batch_size, args.seq_len)
        x, y = x.to(args.device), y.to(args.device)
        with timer.step():
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # a vanilla RNN's gradients explode now and then at this length;
            # clipping keeps its failure a failure to remember, not a blow-up
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        test_mse = nn.functional.mse_loss(model(test_x), test_y).item()
    tail = losses[-max(1, len(losses) // 10):]
    return {"train_loss": losses[-1], "train_loss_tail": sum(tail) / len(tail),
            "test_mse": test_mse, **timer.summary(args.batch_size)}


def main(argv=None):
    parser = common.make_parser(
        __doc__.split("\n\n")[0], steps=600, hidden_size=64, batch_size=64, seq_len=50,
        tiny=dict(steps=3, hidden_size=8, batch_size=4, seq_len=10, test_size=16),
    )
    parser.add_argument("--cells", nargs="+", choices=("RNN", "LSTM", "GRU"),
                        default=["RNN", "LSTM", "GRU"], help="cells to train (RNN is tanh)")
    parser.add_argument("--lr", type=float, default=2e-2, help="Adam learning rate")
    parser.add_argument("--test-size", type=int, default=1000, help="held-out sequences")
    args = common.parse_args(parser, argv)

    # the held-out set comes from its own seed: never seen in training
    test_x, test_y = adding_batch(common.data_generator(args.seed + 10_000),
                                  args.test_size, args.seq_len)
    test_x, test_y = test_x.to(args.device), test_y.to(args.device)
    baseline = nn.functional.mse_loss(torch.ones_like(test_y), test_y).item()

    print(f"adding problem: T={args.seq_len} H={args.hidden_size} B={args.batch_size} "
          f"steps={args.steps} lr={args.lr} on {common.describe_machine(args.device)}")
    runs = []
    for cell in args.cells:
        models = common.twin_models(
            lambda backend: Regressor(backend, cell, args.hidden_size), args.seed, args.device)
        for backend, model in models.items():
            result = train(model, args, test_x, test_y)
            verdict = "learned" if result["test_mse"] < 0.5 * baseline else "not learned"
            runs.append({"cell": cell, "backend": backend, **result, "verdict": verdict})
            print(f"  {cell:4s} {backend:5s} test MSE {result['test_mse']:.4f}  "
                  f"({result['train_s']:.1f} s)", flush=True)

    print(f"\ntest MSE of always predicting 1.0 (the baseline): {baseline:.4f}")
    common.print_table(runs, ["cell", "backend", "test_mse", "verdict", "train_loss_tail",
                              "step_ms", "seq_per_s", "train_s"])
    common.report("adding_problem", args, runs,
                  metrics=["train_loss", "test_mse"], group_keys=["cell"],
                  extra={"baseline_mse": baseline})


if __name__ == "__main__":
    main()
