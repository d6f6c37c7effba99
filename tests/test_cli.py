"""The fused-rnn command: every subcommand on the CPU with a tiny grid; the
JSON, CSV and PNG it writes agree with the printed table; `check` fails when
a kernel is perturbed; bad flags name the flag and the allowed values."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import fused_rnn
from fused_rnn import benchmark, cli

TINY = ["--device", "cpu", "--batch", "2", "3", "--hidden-size", "8", "--seq-len", "4",
        "--repeats", "2", "--warmup", "1", "--no-progress"]


def _table_rows(text):
    """(cell, mode, dtype, B, H, T, speedup) of each table row printed."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 11 and parts[1] in ("forward", "train"):
            assert parts[10] in ("cpu", "persistent", "stepwise", "general")
            rows.append((parts[0], parts[1], parts[2], int(parts[3]), int(parts[4]),
                         int(parts[5]), parts[8]))
    return rows


def test_bench_writes_consistent_json_csv_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (installed by .ci/run)")
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    code = cli.main(["bench", "--cell", "LSTM", "GRU", *TINY, "--json", str(out_json),
                     "--csv", str(out_csv), "--plot", str(out_png)])
    assert code == 0
    printed = _table_rows(capsys.readouterr().out)
    # 2 cells x 2 batches x (forward, train)
    assert len(printed) == 8
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert len(rows) == 8
    assert data["environment"]["device"] == "cpu"
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["fused_rnn"]["version"] == fused_rnn.__version__
    from_json = [(r["cell"], "train" if r["training"] else "forward", r["dtype"], r["batch"],
                  r["hidden_size"], r["seq_len"], f"{r['speedup']:.2f}x") for r in rows]
    assert from_json == printed
    for r in rows:
        assert r["torch_ms"] > 0 and r["fused_ms"] > 0
        assert r["max_abs_error"] < 1e-5  # float32 parity of every row
        assert r["torch_weights_flat"] is True  # no cuDNN weight compaction on the CPU
        assert r["grid_sync"] is None  # no persistent kernel on the CPU
    with open(out_csv) as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["cell"], int(r["batch"]), float(r["fused_ms"])) for r in csv_rows] == [
        (r["cell"], r["batch"], r["fused_ms"]) for r in rows]
    assert all(r["device_name"] for r in csv_rows)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000


def test_bench_packed_sequences(tmp_path, capsys):
    """--packed: variable lengths as a PackedSequence on both sides; each
    row says so (its JSON field, a starred cell in the table) and matches
    torch.nn, training included."""
    out_json = tmp_path / "p.json"
    assert cli.main(["bench", "--cell", "LSTM", "RNN_RELU", *TINY, "--packed",
                     "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "* packed: variable lengths" in out
    printed = _table_rows(out)
    assert len(printed) == 8 and all(r[0] in ("LSTM*", "RNN_RELU*") for r in printed)
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 8 and all(r["packed"] for r in rows)
    assert all(r["max_abs_error"] < 1e-5 for r in rows)


def test_bench_proj_size(tmp_path, capsys):
    """--proj-size: an LSTM with a projection on both sides (rows say so:
    their JSON field, LSTMp<P> in the table), matching torch.nn, training
    included; other cells, or a size not below the hidden size, are refused."""
    out_json = tmp_path / "p.json"
    assert cli.main(["bench", "--cell", "LSTM", *TINY, "--proj-size", "3", "--packed",
                     "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "LSTMpP: LSTM with proj_size P" in out
    printed = _table_rows(out)
    assert len(printed) == 4 and all(r[0] == "LSTMp3*" for r in printed)
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 4 and all(r["proj_size"] == 3 for r in rows)
    assert all(r["max_abs_error"] < 1e-5 for r in rows)
    for flags in (["--cell", "GRU"], ["--cell", "LSTM", "--hidden-size", "3"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", *TINY, *flags, "--proj-size", "3"])


@pytest.mark.parametrize("T,B", [(4, 3), (256, 64), (1, 5), (7, 1)])
def test_packed_lengths(T, B):
    """From the sequence length down to half of it, sorted, one per sequence;
    the packed input has those lengths."""
    config = benchmark.Config("GRU", B, 8, T, packed=True, training=True)
    lengths = benchmark.packed_lengths(config)
    assert len(lengths) == B and lengths == sorted(lengths, reverse=True)
    assert lengths[0] == T and lengths[-1] == (max(1, (T + 1) // 2) if B > 1 else T)
    x, grad = benchmark.make_inputs(config)
    assert isinstance(x, torch.nn.utils.rnn.PackedSequence) and x.data.requires_grad
    assert x.batch_sizes.tolist() == [sum(n > t for n in lengths) for t in range(T)]
    assert grad.shape == (sum(lengths), 8)


def test_bench_presets_expand_to_their_grids():
    args = cli.build_parser().parse_args(["bench", "--preset", "fastrnns"])
    configs = cli.bench_configs(args, "cpu")
    assert {c.cell for c in configs} == set(cli.CELLS)
    assert {(c.seq_len, c.num_layers, c.input_size, c.hidden_size, c.batch) for c in configs} == {
        (100, 1, 512, 512, 64)}
    assert {c.training for c in configs} == {False, True}
    full = cli.bench_configs(cli.build_parser().parse_args(["bench", "--preset", "full"]), "cuda")
    assert {c.dtype for c in full} == {"float32", "bfloat16", "float16"}
    assert {c.batch for c in full} == {1, 8, 64, 256}
    # flags override a preset's axes
    args = cli.build_parser().parse_args(["bench", "--preset", "full", "--cell", "GRU",
                                          "--mode", "forward", "--bidirectional"])
    configs = cli.bench_configs(args, "cpu")
    assert {c.cell for c in configs} == {"GRU"}
    assert not any(c.training for c in configs) and all(c.bidirectional for c in configs)


def test_profile_writes_trace_and_phases(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    code = cli.main(["profile", "--device", "cpu", "--cell", "GRU", "--batch", "3",
                     "--hidden-size", "8", "--seq-len", "5", "--training", "--iterations", "2",
                     "--trace", str(trace)])
    assert code == 0
    out = capsys.readouterr().out
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    for phase in ("fused_rnn::gru_forward", "fused_rnn::recurrence",
                  "fused_rnn::input_projection", "fused_rnn::recurrence_backward",
                  "fused_rnn::weight_gradients"):
        assert phase in names, phase
        assert phase in out
    assert "us per step" in out


def test_explain_names_the_path_and_the_build(capsys):
    assert cli.main(["explain", "--device", "cpu", "--cell", "GRU", "--hidden-size", "64",
                     "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "GRU, B=4, I=64, H=64" in out
    assert "per step: h @ W_hh^T as one GEMM (4 x 192 x 64)" in out
    assert f"GEMMs: {fused_rnn.explain_cpu_gemm()}" in out
    assert "CPU kernels: yes" in out
    if (sys.platform.startswith("linux") and torch.backends.openmp.is_available()
            and os.environ.get("FUSED_RNN_OPENMP", "1") != "0"):
        # Without -fopenmp the extension's at::parallel_for runs on one thread.
        assert "CPU threads: OpenMP" in out
    assert f"running torch: {torch.__version__}" in out


def test_bench_says_how_bidirectional_directions_ran(tmp_path, capsys):
    """A bidirectional row records how its directions ran (the CPU: one after
    the other), in the JSON and the table; a unidirectional row has none."""
    out_json = tmp_path / "r.json"
    assert cli.main(["bench", "--cell", "GRU", *TINY, "--bidirectional", "--json",
                     str(out_json)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out_json.read_text())["rows"]
    assert rows and all(r["bidirectional"] and r["directions"] == "separate" for r in rows)
    assert out.count("  cpu, separate") == len(rows)
    assert cli.main(["bench", "--cell", "GRU", *TINY, "--json", str(out_json)]) == 0
    assert all(r["directions"] is None for r in json.loads(out_json.read_text())["rows"])


def test_bench_tf32_flags(tmp_path, capsys, monkeypatch):
    """--tf32 asks for torch's default TF32 flags on both sides in float32
    rows only; each row says whether fused_rnn multiplied in TF32 (from
    explain, under the flags the row ran with), the table too; the flags
    are restored afterwards."""
    out_json = tmp_path / "r.json"
    seen = []
    real = benchmark._explain

    def explain(config, backward=False):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        text = real(config, backward)
        # as a GPU's float32 plan reads where TF32 is allowed
        return text + " on tensor cores in TF32" if torch.backends.cudnn.allow_tf32 else text

    monkeypatch.setattr(benchmark, "_explain", explain)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    assert cli.main(["bench", "--cell", "GRU", *TINY, "--dtype", "float32", "float64",
                     "--tf32", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out_json.read_text())["rows"]
    assert {r["dtype"]: (r["tf32"], r["math"]) for r in rows} == {
        "float32": (True, "tf32"), "float64": (False, None)}
    assert out.count(", tf32") == sum(r["dtype"] == "float32" for r in rows)
    assert (True, False) in seen and (False, False) in seen
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    seen.clear()
    assert cli.main(["bench", "--cell", "GRU", *TINY, "--json", str(out_json)]) == 0
    assert all(not r["tf32"] and r["math"] is None
               for r in json.loads(out_json.read_text())["rows"])
    assert seen and all(flags == (False, False) for flags in seen)


def test_explain_proj_size(capsys):
    assert cli.main(["explain", "--device", "cpu", "--hidden-size", "64", "--batch", "4",
                     "--proj-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "LSTM, B=4, I=64, H=64, proj_size=16" in out
    assert "h @ W_hh^T as one GEMM (4 x 256 x 16)" in out
    assert "then the projection as one GEMM (4 x 16 x 64)" in out
    assert "one GEMM with W_hh and one with W_hr" in out
    for flags in (["--cell", "GRU"], ["--hidden-size", "16"]):
        with pytest.raises(SystemExit):
            cli.main(["explain", "--device", "cpu", *flags, "--proj-size", "16"])


def test_explain_bidirectional(capsys):
    assert cli.main(["explain", "--device", "cpu", "--bidirectional"]) == 0
    out = capsys.readouterr().out
    assert ", bidirectional" in out
    assert "a layer's two directions in one op, one after the other" in out


def test_check_passes_and_fails_on_a_perturbed_kernel(monkeypatch, capsys):
    assert cli.main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "all cells match torch.nn" in out
    # one CPU path; packed input among the cases; gradients of gradients and
    # a forward-mode derivative (through fused_rnn.reference)
    assert "kernels:" not in out and "ok   LSTM packed" in out and "ok   RNN packed" in out
    assert "ok   LSTM grad-grad" in out and "ok   GRU jvp" in out

    original, original_pair = fused_rnn.ops.gru, fused_rnn.ops.gru_pair

    def perturbed(*args, **kwargs):
        output, hy = original(*args, **kwargs)
        return output + 1e-7, hy

    def perturbed_pair(*args, **kwargs):  # a bidirectional layer's op
        output, hy, output_r, hy_r = original_pair(*args, **kwargs)
        return output + 1e-7, hy, output_r, hy_r

    monkeypatch.setattr(fused_rnn.ops, "gru", perturbed)
    monkeypatch.setattr(fused_rnn.ops, "gru_pair", perturbed_pair)
    assert cli.main(["check", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL GRU " in out and "FAIL GRUCell" not in out.replace("FAIL GRU ", "")
    assert "ok   LSTM" in out

    # a wrong second-order path fails its own case only
    monkeypatch.undo()
    real = fused_rnn.reference.lstm

    def scaled(*args, **kwargs):
        output, hy, cy = real(*args, **kwargs)
        return output * (1 + 1e-6), hy, cy

    monkeypatch.setattr(fused_rnn.reference, "lstm", scaled)
    assert cli.main(["check", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL LSTM grad-grad" in out and out.count("FAIL") == 1


def test_check_takes_one_kernel_path(capsys):
    """`check --kernel` narrows a CUDA check to one path (the device check
    script's preflight uses it); on the CPU, whose one path it does not
    change, it is accepted and the check runs as before."""
    assert cli.main(["check", "--device", "cpu", "--kernel", "persistent"]) == 0
    out = capsys.readouterr().out
    assert "all cells match torch.nn" in out and "kernels:" not in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "--cell", "TRANSFORMER"], "--cell: invalid choice: 'TRANSFORMER' (choose from"),
    (["bench", "--dtype", "int8"], "--dtype: invalid choice: 'int8'"),
    (["bench", "--batch", "0"], "--batch must be positive, got 0"),
    (["bench", "--device", "tpu"], "--device tpu: allowed values are cpu, cuda, cuda:N"),
    (["bench", "--preset", "huge"], "--preset: invalid choice: 'huge' (choose from"),
    (["profile", "--iterations", "0"], "--iterations must be positive, got 0"),
    (["check", "--kernel", "fast"], "--kernel: invalid choice: 'fast' (choose from"),
])
def test_bad_flags_name_the_flag(argv, message, capsys):
    if not torch.cuda.is_available() and "--device" not in argv:
        argv = [*argv, "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_device_without_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--device", "cuda"])
    assert "no CUDA device is available" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "fused_rnn", "explain", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Kernel path:" in result.stdout


def test_kernel_flag_sets_the_path_for_the_command_only(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "run_explain", lambda args, parser: seen.append(
        fused_rnn.get_kernel_path()) or 0)
    before = fused_rnn.get_kernel_path()
    assert cli.main(["explain", "--device", "cpu", "--kernel", "general"]) == 0
    assert seen == ["general"] and fused_rnn.get_kernel_path() == before
    with pytest.raises(SystemExit):
        cli.main(["explain", "--kernel", "fast"])
    assert "--kernel" in capsys.readouterr().err


def test_bench_records_a_failing_configuration_and_goes_on(tmp_path, capsys, monkeypatch):
    """A configuration whose run raises gets a NaN row with its error, the
    rest of the grid still runs, the JSON is written after every row (a run
    cut short keeps what it measured) and the exit status is 1."""
    from fused_rnn import benchmark
    real_run = benchmark.run
    seen = []

    def run(config, **kw):
        seen.append(config)
        if config.cell == "GRU" and config.batch == 2:
            raise RuntimeError("boom\nsecond line")
        row = real_run(config, **kw)
        with open(out_json) as f:  # the rows before this one are on disk already
            assert len(json.load(f)["rows"]) == len(seen) - 1
        return row

    out_json = tmp_path / "r.json"
    out_json.write_text(json.dumps({"rows": []}))
    monkeypatch.setattr(benchmark, "run", run)
    out_csv = tmp_path / "r.csv"
    code = cli.main(["bench", "--cell", "LSTM", "GRU", *TINY, "--mode", "forward",
                     "--json", str(out_json), "--csv", str(out_csv)])
    assert code == 1
    captured = capsys.readouterr()
    assert "FAILED GRU" in captured.err and "RuntimeError: boom" in captured.err
    data = json.loads(out_json.read_text())
    assert data["complete"] is True and len(data["rows"]) == 4
    failed = [r for r in data["rows"] if "error" in r]
    assert [(r["cell"], r["batch"]) for r in failed] == [("GRU", 2)]
    assert failed[0]["error"] == "RuntimeError: boom" and failed[0]["speedup"] != failed[0]["speedup"]
    assert all(r["speedup"] > 0 for r in data["rows"] if "error" not in r)
    assert not os.path.exists(str(out_json) + ".tmp")
    with open(out_csv) as f:  # the failed row and the timed ones, one header
        assert [r["error"] for r in csv.DictReader(f)] == ["", "", "RuntimeError: boom", ""]


def test_tf32_flags_line_follows_torch_flags():
    """What `fused-rnn explain` says of TF32 in float32 on CUDA: cuDNN's RNN
    flag for the persistent and stepwise kernels (cuBLAS's with cuDNN
    disabled), cuBLAS's for the GEMMs; the flags as they are now."""
    saved = (torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.enabled = True
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        line = cli.tf32_flags_line()
        if torch.backends.cudnn.is_available():
            assert "follow torch.backends.cudnn.allow_tf32 = True" in line
        assert line.endswith("torch.backends.cuda.matmul.allow_tf32 = False")
        torch.backends.cudnn.enabled = False
        torch.backends.cuda.matmul.allow_tf32 = True
        line = cli.tf32_flags_line()
        assert "cuDNN disabled: torch.backends.cuda.matmul.allow_tf32 = True" in line
        assert cli.tf32_flags_line((9, 0)) == line
        assert "compute capability 7.5) has no TF32" in cli.tf32_flags_line((7, 5))
    finally:
        (torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved
