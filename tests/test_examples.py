"""The examples under examples/: each runs as a script at a toy size
(--tiny: a few steps, tiny hidden size and sequences) and ends with a
`RESULT {json}` line whose fused_rnn and torch.nn runs agree.

Learning quality is not asserted: a few steps at a toy size learn nothing.
What is asserted is that the two backends, trained from the same weights on
the same batches, report the same metrics. In float32 the fused kernels and
torch.nn's differ by a few ulp per output (~1e-7 relative); over the few
Adam steps run here that grows to at most ~1e-6 relative in the losses
(measured over seeds 0-4 and up to 10 steps), so 1e-4 relative leaves a
100x margin and would still catch a kernel that is merely close.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ("adding_problem", "sequence_classifier", "tagger", "char_lm")
RTOL, ATOL = 1e-4, 1e-6


def run_example(name, *flags):
    proc = subprocess.run(
        [sys.executable, os.path.join("examples", f"{name}.py"), "--tiny", "--device", "cpu",
         *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        # `import common` from examples/ must not leave a __pycache__ behind
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("RESULT "), f"no RESULT line at the end:\n{proc.stdout}"
    return json.loads(lines[-1][len("RESULT "):]), proc.stdout


def twin_pairs(result):
    """(fused run, torch.nn run) for each group of runs that differ only in
    backend (per cell in adding_problem)."""
    keys = result["group_keys"]
    fused = [r for r in result["runs"] if r["backend"] == "fused"]
    torch_runs = [r for r in result["runs"] if r["backend"] == "torch"]
    assert len(fused) == len(torch_runs) >= 1
    pairs = []
    for f in fused:
        matches = [t for t in torch_runs if all(t[k] == f[k] for k in keys)]
        assert len(matches) == 1, f"no single torch.nn twin for {f}"
        pairs.append((f, matches[0]))
    return pairs


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_and_backends_agree(name):
    result, stdout = run_example(name)
    assert result["example"] == name
    assert result["config"]["tiny"] is True
    assert result["metrics"]
    for f, t in twin_pairs(result):
        for run in (f, t):
            for key in (*result["metrics"], "seq_per_s", "step_ms", "train_s"):
                assert math.isfinite(run[key]), f"{run['backend']} {key} = {run[key]}"
            assert run["seq_per_s"] > 0
        for metric in result["metrics"]:
            assert math.isclose(f[metric], t[metric], rel_tol=RTOL, abs_tol=ATOL), (
                f"{name} {metric}: fused {f[metric]!r} vs torch.nn {t[metric]!r}")
    assert all(math.isfinite(s) and s > 0 for s in result["speedup"].values())
    # the human-readable comparison is printed too
    assert "speed-up" in stdout


def test_adding_problem_trains_every_cell():
    result, _ = run_example("adding_problem", "--steps", "2")
    assert sorted(r["cell"] for r in result["runs"]) == ["GRU", "GRU", "LSTM", "LSTM", "RNN", "RNN"]
    # an explicit flag wins over --tiny's default
    assert result["config"]["steps"] == 2


def test_char_lm_samples_from_the_prompt():
    result, stdout = run_example("char_lm", "--cell", "GRU", "--sample-length", "30",
                                 "--prompt", "The ")
    sample = result["sample"]
    assert sample.startswith("The ") and len(sample) == len("The ") + 30
    assert sample in stdout
    assert {r["cell"] for r in result["runs"]} == {"GRU"}
