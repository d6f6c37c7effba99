"""fused_rnn where PyTorch users already work: torch.export, torch.jit.trace, torch.compile
training steps (inductor on the CPU, reduce-overhead CUDA graphs on a GPU),
DistributedDataParallel over gloo, and the packaging (sdist, __version__,
a clear error when the compiled extension cannot load)."""

import copy
import importlib
import os
import subprocess
import sys
import tarfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_rnn
from fused_rnn import _C_loader
from helpers import tf32_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tagger(nn.Module):
    """A small model holding a fused LSTM (bidirectional, 2 layers) and GRU,
    or their torch.nn twins (backend)."""

    def __init__(self, backend, input_size=5, hidden_size=6):
        super().__init__()
        self.lstm = backend.LSTM(input_size, hidden_size, num_layers=2, bidirectional=True)
        self.gru = backend.GRU(2 * hidden_size, hidden_size)
        self.head = nn.Linear(hidden_size, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, h = self.gru(y)
        return self.head(y + h.sum(0).unsqueeze(0))


def _twins(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    reference = Tagger(nn).to(device, dtype)
    fused = fused_rnn.convert(copy.deepcopy(reference))
    assert isinstance(fused.lstm, fused_rnn.LSTM) and isinstance(fused.gru, fused_rnn.GRU)
    return reference, fused


def _train(model, batches, lr=0.1, compiled_step=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step(x, target):
        optimizer.zero_grad(set_to_none=True)
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    step = compiled_step(step) if compiled_step else step
    losses = []
    for x, target in batches:
        if compiled_step and torch.cuda.is_available():
            # one training iteration per CUDA-graph tree step
            torch.compiler.cudagraph_mark_step_begin()
        # a copy: a CUDA graph's output is overwritten by its next replay
        losses.append(step(x, target).clone())
    return losses


def _batches(count, dtype=torch.float32, device="cpu", batch=4, steps=5):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(steps, batch, 5, generator=generator).to(device, dtype),
             torch.randn(steps, batch, 3, generator=generator).to(device, dtype))
            for _ in range(count)]


# ------------------------------------------------------------------ export
def test_torch_export_of_a_model_matches_eager():
    _, fused = _twins()
    fused.eval()
    x = torch.randn(7, 2, 5)
    steps = torch.export.Dim("steps", min=2, max=64)
    exported = torch.export.export(fused, (x,), dynamic_shapes={"x": {0: steps}})
    op_names = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    # the bidirectional LSTM's layers as one op each (both directions)
    assert "fused_rnn.lstm_forward_pair.default" in op_names
    assert "fused_rnn.gru_forward.default" in op_names
    torch.testing.assert_close(exported.module()(x), fused(x), atol=0, rtol=0)
    # another sequence length through the same exported program
    other = torch.randn(11, 2, 5)
    torch.testing.assert_close(exported.module()(other), fused(other), atol=0, rtol=0)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_jit_trace_passes_its_check_and_matches_eager(tmp_path, grad_mode):
    """torch.jit.trace records the ops, and its own check (a second trace
    under no_grad on other inputs, compared graph and outputs) passes: the
    ops' train flag follows requires_grad alone while tracing, as torch.nn
    records train=self.training. The trace runs other lengths, trains and
    survives save / load, traced with grad mode on or off."""
    _, fused = _twins()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.set_grad_enabled(grad_mode):
            # a check whose graph differs raises TracingCheckError
            traced = torch.jit.trace(fused, (torch.randn(7, 2, 5),),
                                     check_inputs=[(torch.randn(4, 3, 5),)])
    # one whose outputs differ only warns
    mismatches = [str(w.message) for w in caught
                  if "does not match" in str(w.message) or "nondeterministic" in str(w.message)]
    assert not mismatches
    ops = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "fused_rnn::lstm_forward_pair" in ops and "fused_rnn::gru_forward" in ops
    path = str(tmp_path / "tagger.pt")
    traced.save(path)
    loaded = torch.jit.load(path)
    x = torch.randn(11, 3, 5, requires_grad=True)
    expected = fused(x)
    for module in (traced, loaded):
        out = module(x)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0],
                                   torch.autograd.grad(expected.sum(), x, retain_graph=True)[0],
                                   atol=0, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(module(x), expected, atol=0, rtol=0)


def test_jit_trace_of_a_frozen_module_runs_inference_and_says_why_it_cannot_train():
    """Traced with nothing requiring grad, the ops record train=False (no
    memory kept for backward); a backward through that trace then names the
    cause instead of returning wrong gradients."""
    _, fused = _twins()
    fused.requires_grad_(False)
    x = torch.randn(7, 2, 5)
    traced = torch.jit.trace(fused, (x,))
    torch.testing.assert_close(traced(x), fused(x), atol=0, rtol=0)
    fused.requires_grad_(True)
    out = traced(x.requires_grad_())
    with pytest.raises(RuntimeError, match="torch.jit.trace taken while nothing required grad"):
        out.sum().backward()


class CellStep(nn.Module):
    """A model holding one of each cell, for torch.jit.script."""

    def __init__(self, backend, input_size=5, hidden_size=6):
        super().__init__()
        self.lstm = backend.LSTMCell(input_size, hidden_size)
        self.gru = backend.GRUCell(hidden_size, hidden_size)
        self.rnn = backend.RNNCell(hidden_size, hidden_size, nonlinearity="relu")

    def forward(self, x):
        h, c = self.lstm(x)
        return self.rnn(self.gru(h)) + c


@pytest.mark.parametrize("model", [Tagger, CellStep])
def test_jit_script_takes_the_torch_twins(model, tmp_path):
    """TorchScript cannot run the fused ops' autograd, so torch.jit.script
    scripts each fused module as its torch.nn twin (same Parameters), says
    so, and the scripted model computes what the eager one did."""
    torch.manual_seed(0)
    fused = fused_rnn.convert(model(nn))
    x = torch.randn(7, 2, 5) if model is Tagger else torch.randn(3, 5)
    expected = fused(x)
    parameters = list(fused.parameters())
    with pytest.warns(UserWarning, match="is scripted as its torch.nn twin"):
        scripted = torch.jit.script(fused)
    torch.testing.assert_close(scripted(x), expected, atol=1e-6, rtol=1e-6)
    path = str(tmp_path / "model.pt")
    scripted.save(path)
    torch.testing.assert_close(torch.jit.load(path)(x), expected, atol=1e-6, rtol=1e-6)
    # torch.jit put the twins in the eager model: the same Parameters
    assert not any(type(m).__module__.startswith("fused_rnn") for m in fused.modules())
    assert all(a is b for a, b in zip(fused.parameters(), parameters))
    fused_rnn.convert(fused)
    torch.testing.assert_close(fused(x), expected, atol=0, rtol=0)


# ----------------------------------------------------------------- compile
def test_compile_default_mode_training_steps_match_eager_cpu():
    reference, fused = _twins()
    compiled_model = copy.deepcopy(fused)
    batches = _batches(3)
    eager_losses = _train(fused, batches)
    compiled_losses = _train(
        compiled_model, batches, compiled_step=lambda f: torch.compile(f, fullgraph=False)
    )
    torch_losses = _train(reference, batches)
    for a, b, c in zip(eager_losses, compiled_losses, torch_losses):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(fused.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_compile_reduce_overhead_training_steps_match_eager_cuda():
    _, fused = _twins(device="cuda")
    compiled_model = copy.deepcopy(fused)
    batches = _batches(4, device="cuda")
    with tf32_flags(cudnn=False, matmul=False):  # (restored for the tests after)
        eager_losses = _train(fused, batches)
        compiled_losses = _train(
            compiled_model, batches,
            compiled_step=lambda f: torch.compile(f, mode="reduce-overhead"),
        )
    for a, b in zip(eager_losses, compiled_losses):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(fused.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5, msg=name)


# --------------------------------------------------------------------- DDP
def _ddp_worker(rank, world_size, store_path, initial_state, batches, result_path):
    torch.set_num_threads(1)
    # A file store: no TCP port to pick (and possibly lose to another process).
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size)
    try:
        model = Tagger(fused_rnn).double()
        model.load_state_dict(initial_state)
        ddp = nn.parallel.DistributedDataParallel(model)
        # each rank trains on its half of every batch; DDP averages the
        # gradients, which equals the full-batch mean loss's gradient
        shards = [(x.chunk(world_size, dim=1)[rank], t.chunk(world_size, dim=1)[rank])
                  for x, t in batches]
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for x, target in shards:
            optimizer.zero_grad(set_to_none=True)
            (ddp(x) - target).pow(2).mean().backward()
            optimizer.step()
        if rank == 0:
            torch.save(model.state_dict(), result_path)
        # neither rank tears gloo down while the other still talks to it
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_one_process_and_torch_nn(tmp_path):
    reference, fused = _twins(torch.float64)
    initial_state = copy.deepcopy(fused.state_dict())
    batches = _batches(4, torch.float64)
    result_path = str(tmp_path / "ddp_state.pt")
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "store"), initial_state, batches, result_path),
        nprocs=2, join=True, start_method="spawn",
    )
    ddp_state = torch.load(result_path)
    _train(fused, batches)
    _train(reference, batches)
    for name, value in fused.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, atol=1e-10, rtol=1e-10, msg=name)
        torch.testing.assert_close(reference.state_dict()[name], value, atol=1e-10, rtol=1e-10,
                                   msg=name)
    # the training moved the weights: the comparison is not of untouched ones
    assert not torch.equal(ddp_state["lstm.weight_hh_l0"], initial_state["lstm.weight_hh_l0"])


# --------------------------------------------------------------- packaging
def test_version():
    assert fused_rnn.__version__ == "0.1.0"
    from importlib.metadata import version

    assert version("fused_rnn") == fused_rnn.__version__


def test_missing_extension_error_is_actionable(monkeypatch):
    def fail(name, *args, **kwargs):
        raise ImportError(
            "/x/fused_rnn/_C.abi3.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv"
        )

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(ImportError) as error:
        _C_loader.load_extension()
    message = str(error.value)
    assert "compiled against another torch release" in message
    assert f"installed torch {torch.__version__}" in message
    assert "pip install --no-build-isolation" in message


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")),
                    reason="compares the sdist with the files git tracks (a checkout, not an sdist)")
def test_sdist_holds_everything_a_build_needs(tmp_path):
    pytest.importorskip("build", reason="python -m build (pip install build) makes the sdist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), ROOT],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "FUSED_RNN_CUDA": "0"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (sdist,) = tmp_path.glob("fused_rnn-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    needed = [f for f in tracked if f.startswith(("csrc/", "fused_rnn/", "tests/"))
              or f in ("setup.py", "pyproject.toml", "README.md")]
    missing = sorted(set(needed) - names)
    assert not missing, missing
    assert "fused_rnn/_build_config.py" not in names
