"""Many-to-many tagging with a bidirectional LSTM over packed, variable-length
batches.

Each sequence has a random length between T/2 and T and its tokens are drawn
uniformly from a vocabulary of 4 (token ids 1..4; 0 is padding). Token t gets
one of four tags, two bits:

    bit 0: token t equals token t-k (the token k positions before it)
    bit 1: token t equals token t+k (the token k positions after it)

with k = 5 by default (--offset). A position whose partner falls outside the
sequence counts as "not equal". Bit 1 needs the right-hand context, which
only the backward direction of a bidirectional RNN brings; and it needs the
backward direction to start at each sequence's own last token, not at the end
of the padding. That is what packing gives: the batch goes through
pack_padded_sequence(..., enforce_sorted=False), the LSTM runs on the
PackedSequence (each step touches only the sequences still running), and
pad_packed_sequence turns the output back into a padded tensor for the
per-token classifier. Token accuracy ignores the padding.

Always predicting "neither" scores (3/4)^2 ≈ 56%, a bit more with the
sequence ends counted (~61% at the defaults). At the defaults (k = 5, 500
steps) the model tags the held-out set perfectly or nearly so; larger k is
harder (k = 6 is at ~72% after 400 steps), smaller k easier (k = 3 is solved
in 300).

The model is trained twice from the same initial weights on the same batches:
with fused_rnn.LSTM and with torch.nn.LSTM (both bidirectional, both fed the
same PackedSequence).

    python examples/tagger.py                          # ~20-30 s on 2 cores
    python examples/tagger.py --offset 8 --steps 2000  # harder
"""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import common

VOCAB = 4
PAD = 0
IGNORE = -100  # cross_entropy's default ignore_index: padding positions


def tagging_batch(generator, batch_size, max_len, offset):
    """(tokens [B, T] with PAD after each length, lengths [B] int64 on the
    CPU, tags [B, T] with IGNORE on padding)."""
    lengths = torch.randint(max_len // 2, max_len + 1, (batch_size,), generator=generator)
    tokens = torch.randint(1, VOCAB + 1, (batch_size, max_len), generator=generator)
    valid = torch.arange(max_len)[None, :] < lengths[:, None]
    tokens[~valid] = PAD
    # compare each token with the one `offset` before / after it; padding is
    # PAD, which no real token equals, so positions whose partner lies past
    # the end of their sequence come out "not equal" for free
    before = torch.zeros_like(tokens, dtype=torch.bool)
    after = torch.zeros_like(tokens, dtype=torch.bool)
    before[:, offset:] = tokens[:, offset:] == tokens[:, :-offset]
    after[:, :-offset] = tokens[:, :-offset] == tokens[:, offset:]
    tags = before.long() + 2 * after.long()
    tags[~valid] = IGNORE
    return tokens, lengths, tags


class Tagger(nn.Module):
    """`backend` is fused_rnn or torch.nn."""

    def __init__(self, backend, hidden_size, embedding_size=16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB + 1, embedding_size, padding_idx=PAD)
        self.rnn = backend.LSTM(embedding_size, hidden_size, batch_first=True,
                                bidirectional=True)
        self.head = nn.Linear(2 * hidden_size, 4)

    def forward(self, tokens, lengths):
        # lengths must live on the CPU (pack_padded_sequence's rule); the
        # batch is unsorted, so let it sort and unsort for us
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.size(1))
        return self.head(out)                                    # [B, T, 4]


def loss_and_accuracy(logits, tags):
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), tags.flatten(),
                                       ignore_index=IGNORE)
    real = tags != IGNORE
    accuracy = (logits.argmax(-1)[real] == tags[real]).float().mean()
    return loss, accuracy


def train(model, args, test_batch):
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = common.data_generator(args.seed)
    timer = common.StepTimer(args.device)
    for _ in range(args.steps):
        tokens, lengths, tags = tagging_batch(generator, args.batch_size, args.seq_len,
                                              args.offset)
        tokens, tags = tokens.to(args.device), tags.to(args.device)
        with timer.step():
            loss, _ = loss_and_accuracy(model(tokens, lengths), tags)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    tokens, lengths, tags = test_batch
    with torch.no_grad():
        test_loss, accuracy = loss_and_accuracy(model(tokens, lengths), tags)
    return {"train_loss": loss.item(), "test_loss": test_loss.item(),
            "token_accuracy": accuracy.item(), **timer.summary(args.batch_size)}


def main(argv=None):
    parser = common.make_parser(
        __doc__.split("\n\n")[0], steps=500, hidden_size=64, batch_size=32, seq_len=48,
        tiny=dict(steps=3, hidden_size=8, batch_size=4, seq_len=12, offset=2, test_size=16),
    )
    parser.add_argument("--offset", type=int, default=5,
                        help="k: tag bits compare each token with the ones k before and after")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--test-size", type=int, default=1000, help="held-out sequences")
    args = common.parse_args(parser, argv)
    if not 0 < args.offset < args.seq_len // 2:
        parser.error("--offset must be between 1 and seq_len/2 - 1")

    tokens, lengths, tags = tagging_batch(common.data_generator(args.seed + 10_000),
                                          args.test_size, args.seq_len, args.offset)
    test_batch = (tokens.to(args.device), lengths, tags.to(args.device))
    real = tags != IGNORE
    majority = (tags[real] == 0).float().mean().item()

    print(f"bidirectional LSTM tagger: k={args.offset} T<={args.seq_len} H={args.hidden_size} "
          f"B={args.batch_size} steps={args.steps} lr={args.lr} "
          f"on {common.describe_machine(args.device)}")
    models = common.twin_models(lambda backend: Tagger(backend, args.hidden_size),
                                args.seed, args.device)
    runs = [{"cell": "LSTM", "backend": backend, **train(model, args, test_batch)}
            for backend, model in models.items()]

    print(f"\nheld-out set: {args.test_size} sequences, {int(real.sum())} tokens; "
          f"always tagging 'neither' scores {majority:.3f}")
    common.print_table(runs, ["cell", "backend", "token_accuracy", "test_loss", "train_loss",
                              "step_ms", "seq_per_s", "train_s"])
    common.report("tagger", args, runs, metrics=["train_loss", "test_loss", "token_accuracy"],
                  extra={"majority_accuracy": majority})


if __name__ == "__main__":
    main()
