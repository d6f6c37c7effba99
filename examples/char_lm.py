"""A character-level language model trained with truncated backpropagation
through time, then sampled one character at a time (one-to-many).

The text ships with Python: the Zen of Python (`this.s`, stored rot13-encoded)
followed by the docstrings of a fixed list of standard-library modules and
their public classes and functions (~160,000 characters on Python 3.11; the
exact text depends on the Python version). The last 10% is held out.

Training cuts the text into `batch_size` parallel streams and walks them in
chunks of `seq_len` characters, carrying the recurrent state from one chunk
to the next but detaching it, so gradients flow back at most `seq_len` steps
(truncated BPTT) while the state still summarises everything read before.

The model is built once with torch.nn.LSTM (or GRU) and a deep copy of it is
converted with `fused_rnn.convert`, which swaps that module for its fused_rnn
twin in place; so both start from the same weights and then train on the
same chunks.
Held-out loss (nats per character), bits per character and perplexity are
reported for both (seq/s counts BPTT chunks of seq_len characters). Finally
the fused model generates text: it reads the prompt, then repeatedly
samples the next character from softmax(logits / temperature) and feeds it
back, one step per call, with the state ((h, c) for LSTM, h for GRU) carried
from call to call.

    python examples/char_lm.py                         # ~20-30 s on 2 cores
    python examples/char_lm.py --cell GRU --hidden-size 256 --steps 3000 --temperature 0.6
"""

import codecs
import contextlib
import copy
import importlib
import inspect
import io
import math

import torch
from torch import nn

import common
import fused_rnn

MODULES = (
    "argparse", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "difflib", "enum", "fractions", "functools", "heapq", "itertools",
    "json", "logging", "pathlib", "pickle", "random", "re", "shutil", "statistics",
    "string", "subprocess", "tempfile", "textwrap", "threading", "typing", "zipfile",
)


def python_text():
    """The Zen of Python, then stdlib docstrings, as one string."""
    # `import this` prints the Zen; keep it off our output
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    parts = [codecs.decode(this.s, "rot13")]
    for name in MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_"):
                continue
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


class CharLM(nn.Module):
    def __init__(self, vocab_size, hidden_size, cell="LSTM", num_layers=1, embedding_size=32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding_size)
        # built from torch.nn; fused_rnn.convert swaps this module for its twin
        self.rnn = getattr(nn, cell)(embedding_size, hidden_size, num_layers=num_layers,
                                     batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids, state=None):
        out, state = self.rnn(self.embed(ids), state)
        return self.head(out), state


def detach(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def streams(ids, num_streams):
    """[num_streams, n]: ids cut into contiguous streams, read in parallel."""
    n = len(ids) // num_streams
    return ids[: n * num_streams].view(num_streams, n)


def train(model, args, train_streams, test_streams):
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    timer = common.StepTimer(args.device)
    state, position = None, 0
    for _ in range(args.steps):
        if position + args.seq_len + 1 > train_streams.size(1):
            state, position = None, 0     # one pass over the text done: start over
        chunk = train_streams[:, position: position + args.seq_len + 1]
        position += args.seq_len
        with timer.step():
            # the state from the previous chunk, cut off from its graph
            logits, state = model(chunk[:, :-1], detach(state))
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    model.eval()
    with torch.no_grad():
        # no backward, so each held-out stream goes through in one call
        logits, _ = model(test_streams[:, :-1])
        test_loss = nn.functional.cross_entropy(logits.flatten(0, 1),
                                                test_streams[:, 1:].flatten()).item()
    return {"train_loss": loss.item(), "test_loss": test_loss,
            "bits_per_char": test_loss / math.log(2), "perplexity": math.exp(test_loss),
            **timer.summary(args.batch_size)}


@torch.no_grad()
def sample(model, prompt, length, temperature, stoi, itos, device, seed):
    """The prompt, continued by `length` sampled characters."""
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    ids = torch.tensor([[stoi[c] for c in prompt]], device=device)
    logits, state = model(ids)          # read the whole prompt in one call
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
        next_id = torch.multinomial(probs, 1, generator=generator)
        out.append(itos[next_id.item()])
        # one step: the new character and the state carried from the last call
        logits, state = model(next_id.view(1, 1), state)
    return prompt + "".join(out)


def main(argv=None):
    parser = common.make_parser(
        __doc__.split("\n\n")[0], steps=500, hidden_size=128, batch_size=32, seq_len=64,
        tiny=dict(steps=3, hidden_size=8, batch_size=4, seq_len=8, sample_length=20,
                  text_chars=4000),
    )
    parser.add_argument("--cell", choices=("LSTM", "GRU"), default="LSTM", help="recurrent cell")
    parser.add_argument("--layers", type=int, default=1, help="stacked recurrent layers")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    parser.add_argument("--text-chars", type=int, default=0,
                        help="use only the first N characters of the text (0: all of it)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature: lower is more conservative")
    parser.add_argument("--sample-length", type=int, default=200,
                        help="characters to generate after the prompt")
    parser.add_argument("--prompt", default="Return the ", help="text the sample starts from")
    args = common.parse_args(parser, argv)

    text = python_text()
    if args.text_chars:
        text = text[: args.text_chars]
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    if any(c not in stoi for c in args.prompt):
        parser.error("--prompt uses a character that is not in the text")
    ids = torch.tensor([stoi[c] for c in text])
    split = int(0.9 * len(ids))
    train_streams = streams(ids[:split], args.batch_size).to(args.device)
    # held out: the last 10%, as a few long streams
    test_streams = streams(ids[split:], 8).to(args.device)

    print(f"char LM: {len(text)} characters ({len(itos)} distinct), {args.cell} "
          f"layers={args.layers} H={args.hidden_size} B={args.batch_size} "
          f"BPTT={args.seq_len} steps={args.steps} lr={args.lr} "
          f"on {common.describe_machine(args.device)}")
    torch.manual_seed(args.seed)
    torch_model = CharLM(len(itos), args.hidden_size, args.cell, args.layers).to(args.device)
    # a deep copy keeps the torch.nn model intact; convert shares the copy's
    # Parameters with the fused twin, so both start from the same weights
    fused_model = fused_rnn.convert(copy.deepcopy(torch_model))
    assert isinstance(fused_model.rnn, getattr(fused_rnn, args.cell))

    runs = []
    for backend, model in (("fused", fused_model), ("torch", torch_model)):
        runs.append({"cell": args.cell, "backend": backend,
                     **train(model, args, train_streams, test_streams)})

    print(f"\nheld-out: the last {len(ids) - split} characters "
          f"(uniform over the alphabet would be {math.log(len(itos)):.2f} nats/char)")
    common.print_table(runs, ["cell", "backend", "test_loss", "bits_per_char", "perplexity",
                              "train_loss", "step_ms", "seq_per_s", "train_s"])

    text_out = sample(fused_model, args.prompt, args.sample_length, args.temperature,
                      stoi, itos, args.device, args.seed)
    print(f"\nsampled from the fused model (temperature {args.temperature}):\n")
    print(text_out)
    print()
    common.report("char_lm", args, runs, metrics=["train_loss", "test_loss"],
                  extra={"sample": text_out})


if __name__ == "__main__":
    main()
