"""bench/goals.py: the GPU speed goals checked against benchmark JSON, here
on synthetic rows (the real ones come from bench/device_check.sh on a GPU)."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("goals", os.path.join(ROOT, "bench", "goals.py"))
goals = importlib.util.module_from_spec(spec)
spec.loader.exec_module(goals)


def row(cell="LSTM", dtype="float32", batch=8, hidden=256, training=False, speedup=5.0,
        us=2.0, layers=1, bidirectional=False):
    return dict(cell=cell, dtype=dtype, batch=batch, hidden_size=hidden, input_size=hidden,
                seq_len=256, num_layers=layers, bidirectional=bidirectional, training=training,
                speedup=speedup, fused_us_per_step=us, kernel="persistent", max_abs_error=1e-6)


def full_grid(**overrides):
    rows = []
    for cell in ("LSTM", "GRU"):
        for dtype in ("float32", "bfloat16", "float16"):
            for batch in (1, 8, 64, 256):
                for hidden in (256, 512, 1024):
                    for training in (False, True):
                        rows.append(row(cell, dtype, batch, hidden, training))
    return rows


def verdicts(lines):
    return {line.split()[0] for line in lines}


def test_all_pass_and_missing_files_are_no_data():
    lines = goals.check({"grid": full_grid()})
    assert len(lines) == len(goals.GOALS)
    assert [l.split()[0] for l in lines[:5]] == ["PASS"] * 5
    assert all(line.startswith("NO DATA") for line in lines[5:])


def test_a_slow_row_misses_and_is_named():
    grid = full_grid()
    for r in grid:
        if (r["cell"], r["dtype"], r["batch"], r["hidden_size"], r["training"]) == \
                ("GRU", "bfloat16", 64, 1024, False):
            r["speedup"] = 3.5
    lines = goals.check({"grid": grid})
    assert lines[0].startswith("MISS") and "GRU bfloat16 B=64 H=1024 forward: 3.50x" in lines[0]
    assert lines[3].startswith("PASS")  # fwd+bwd rows unaffected


def test_fp16_bound_is_one_only_where_cudnn_is_persistent():
    """cuDNN's persistent fp16 LSTM runs at batches that are multiples of 8."""
    grid = full_grid()
    for r in grid:
        if r["dtype"] == "float16" and r["batch"] in (8, 64) and not r["training"]:
            r["speedup"] = 1.2
    line = goals.check({"grid": grid})[1]
    assert line.startswith("MISS") and "GRU float16 B=" in line
    for r in grid:
        if r["dtype"] == "float16" and r["cell"] == "GRU":
            r["speedup"] = 4.5
    assert goals.check({"grid": grid})[1].startswith("PASS")
    for r in grid:
        if r["dtype"] == "float16" and r["cell"] == "LSTM" and r["batch"] == 1:
            r["speedup"] = 1.2
    assert goals.check({"grid": grid})[1].startswith("MISS")


@pytest.mark.parametrize("field,missed", [("speedup", (0, 1, 3, 4)),
                                          ("fused_us_per_step", (2,)),
                                          ("max_abs_error", (0, 1, 2, 3, 4))])
def test_a_failed_run_never_passes(field, missed):
    """NaN compares false both ways: a goal on a NaN metric, or on any row
    whose parity error is NaN, misses."""
    grid = full_grid()
    for r in grid:
        r[field] = float("nan")
    lines = goals.check({"grid": grid})
    assert [i for i, line in enumerate(lines[:5]) if line.startswith("MISS")] == list(missed)


@pytest.mark.parametrize("source,index", [("general", 6), ("stepwise", 7)])
def test_per_step_goals_take_only_their_path_rows(source, index):
    rows = [dict(r, kernel=source) for r in full_grid()]
    assert goals.check({source: rows})[index].startswith("PASS")
    rows[3]["speedup"] = 0.9
    assert goals.check({source: rows})[index].startswith("MISS")
    wrong = [dict(r, kernel="persistent") for r in full_grid()]
    assert goals.check({source: wrong})[index].startswith("NO DATA")


def test_latency_goal_only_small_batch_and_hidden():
    grid = full_grid()
    for r in grid:
        if r["batch"] == 64 or r["hidden_size"] == 1024:
            r["fused_us_per_step"] = 50.0
    assert goals.check({"grid": grid})[2].startswith("PASS")
    grid[0]["fused_us_per_step"] = 3.1  # LSTM fp32 B=1 H=256 forward
    assert goals.check({"grid": grid})[2].startswith("MISS")


def test_main_reads_files_and_sets_exit_status(tmp_path, capsys):
    grid = tmp_path / "card.json"
    grid.write_text(json.dumps({"environment": {}, "rows": full_grid()}))
    bidir = tmp_path / "card-bidir.json"
    bidir.write_text(json.dumps({"rows": [row(batch=64, hidden=512, layers=2, bidirectional=True,
                                              speedup=s, training=t)
                                          for s, t in ((3.5, False), (2.5, True))]}))
    assert goals.main([str(grid)]) == 0
    assert goals.main([str(grid), "--bidir", str(bidir)]) == 1
    out = capsys.readouterr().out
    assert "MISS     2-layer bidirectional LSTM" in out and "fwd+bwd: 2.50x" in out


def test_a_cut_short_file_is_named_partial(tmp_path, capsys):
    grid = tmp_path / "card.json"
    grid.write_text(json.dumps({"environment": {}, "complete": False, "rows": full_grid()[:5]}))
    goals.main([str(grid)])
    out = capsys.readouterr().out
    assert f"PARTIAL  {grid}: the bench was cut short after 5 rows" in out
    grid.write_text(json.dumps({"environment": {}, "complete": True, "rows": full_grid()}))
    goals.main([str(grid)])
    assert "PARTIAL" not in capsys.readouterr().out


def test_barrier_comparison_pairs_the_shapes_that_took_the_tags(tmp_path, capsys):
    """--barrier compares, shape by shape, the grid as the automatic choice
    ran it with the same grid forced to a barrier; only where that choice
    took the tagged exchange; never a goal (the exit status is the goals')."""
    grid = full_grid()
    for r in grid:
        r["fused_ms"] = 1.0
        r["grid_sync"] = "tags" if r["batch"] <= 8 else "barrier"
    slow = next(r for r in grid if r["batch"] == 8 and r["training"])
    slow["grid_sync"], slow["fused_ms"] = "tags/barrier", 4.0
    barrier = [dict(r, fused_ms=2.0, grid_sync="barrier") for r in grid]
    line = goals.compare_sync(grid, barrier)
    paired = sum(1 for r in grid if "tags" in r["grid_sync"])
    assert line.startswith("COMPARE") and f"over {paired} shapes" in line
    assert f"({paired - 1} faster with tags)" in line and "median 2.00x" in line
    assert "lowest 0.50x (LSTM float32 B=8" in line and "highest 2.00x" in line
    assert goals.compare_sync(grid, []).startswith("NO DATA")
    assert goals.compare_sync([dict(r, grid_sync="barrier") for r in grid],
                              barrier).startswith("NO DATA")

    paths = {}
    for name, rows in (("grid", grid), ("barrier", barrier)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps({"rows": rows}))
    status = goals.main([str(paths["grid"]), "--barrier", str(paths["barrier"])])
    out = capsys.readouterr().out
    assert "COMPARE  tagged exchange vs grid barrier" in out
    assert status == goals.main([str(paths["grid"])])


def test_cluster_comparison_pairs_the_shapes_that_took_a_cluster(tmp_path, capsys):
    """--tags compares, shape by shape, the grid as the automatic choice ran
    it with the same grid forced to the tagged exchange, only where that
    choice took the cluster exchange (in either pass); never a goal."""
    grid = full_grid()
    for r in grid:
        r["fused_ms"] = 1.0
        r["grid_sync"] = "cluster" if r["batch"] == 1 else "tags"
    mixed = next(r for r in grid if r["batch"] == 1 and r["training"])
    mixed["grid_sync"], mixed["fused_ms"] = "cluster/tags", 4.0
    tags = [dict(r, fused_ms=3.0, grid_sync="tags") for r in grid]
    line = goals.compare_cluster(grid, tags)
    took = sum(1 for r in grid if "cluster" in r["grid_sync"])
    assert took < len(grid)
    assert line.startswith("COMPARE  cluster exchange vs tagged exchange") and \
        f"over {took} shapes" in line, line
    assert f"({took - 1} faster in a cluster)" in line and "median 3.00x" in line
    assert "lowest 0.75x (LSTM float32 B=1" in line, line
    assert goals.compare_cluster(grid, []).startswith("NO DATA")
    assert "took a cluster" in goals.compare_cluster(tags, tags)

    paths = {}
    for name, rows in (("grid", grid), ("tags", tags)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps({"rows": rows}))
    status = goals.main([str(paths["grid"]), "--tags", str(paths["tags"])])
    assert "COMPARE  cluster exchange vs tagged exchange" in capsys.readouterr().out
    assert status == goals.main([str(paths["grid"])])


def test_pairs_comparison_covers_the_paired_rows(tmp_path, capsys):
    """--pairs compares bidirectional rows whose directions shared each
    launch with the same shapes run one direction after the other; rows that
    ran separate by default are left out; never a goal."""
    rows = [dict(cell="LSTM", batch=64, hidden_size=512, dtype=dtype, training=training,
                 num_layers=2, bidirectional=True, seq_len=256, kernel="persistent",
                 fused_ms=1.0, torch_ms=3.0, speedup=3.0, max_abs_error=0.0,
                 fused_us_per_step=1e3 / 256, torch_us_per_step=3e3 / 256,
                 directions="paired" if dtype != "float32" else "separate")
            for dtype in ("float32", "bfloat16", "float16") for training in (False, True)]
    separate = [dict(r, fused_ms=1.8, directions="separate") for r in rows]
    line = goals.compare_directions(rows, separate)
    assert line.startswith("COMPARE") and "over 4 shapes (4 faster paired)" in line
    assert "median 1.80x" in line
    assert goals.compare_directions(separate, separate).startswith("NO DATA")
    paths = []
    for name, data in (("paired", rows), ("separate", separate)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"rows": data}))
    goals.main([str(paths[0]), "--pairs", str(paths[0]), str(paths[1])])
    assert "COMPARE  both directions in one launch vs one after the other" in (
        capsys.readouterr().out)


def test_tf32_comparison_covers_the_rows_that_ran_in_tf32(tmp_path, capsys):
    """--tf32 compares float32 rows that multiplied in TF32 (torch's default
    flags on both sides) with the same shapes of the exact-float32 grid, and
    reports their speed-up over cuDNN in TF32; rows that stayed exact (B <=
    8, or a shape whose TF32 tiles do not fit) are left out; never a goal."""
    grid = [dict(row(cell, "float32", batch, hidden, training), fused_ms=2.0)
            for cell in ("LSTM", "GRU") for batch in (8, 64) for hidden in (512, 1024)
            for training in (False, True)]
    tf32 = [dict(r, fused_ms=1.0 if r["batch"] == 64 else 2.0, tf32=True,
                 math="tf32" if r["batch"] == 64 else None,
                 speedup=3.0 if r["hidden_size"] == 512 else 1.5) for r in grid]
    line, speed = goals.compare_tf32(tf32, grid)
    assert line.startswith("COMPARE  float32 in TF32 vs exact")
    assert "median 2.00x over 8 shapes (8 faster in TF32)" in line
    assert speed.startswith("COMPARE  float32 in TF32 vs cuDNN in TF32: speed-up median 3.00x "
                            "over 8 rows; lowest 1.50x")
    assert goals.compare_tf32([dict(r, math=None) for r in tf32], grid)[0].startswith(
        "NO DATA  float32 in TF32 vs exact (no row ran in TF32)")
    paths = [tmp_path / "grid.json", tmp_path / "tf32.json"]
    paths[0].write_text(json.dumps({"rows": grid}))
    paths[1].write_text(json.dumps({"rows": tf32}))
    goals.main([str(paths[0]), "--tf32", str(paths[1])])
    out = capsys.readouterr().out
    assert "COMPARE  float32 in TF32 vs exact" in out and "vs cuDNN in TF32" in out


def test_graphs_comparison_covers_the_general_rows_that_replayed(tmp_path, capsys):
    """--nographs compares general-path rows whose loops replayed CUDA graphs
    while timed with the same shapes run with FUSED_RNN_CUDA_GRAPHS=off; rows
    that ran without graphs (a step too large) are left out; never a goal."""
    general = [dict(row(cell, "float32", batch, 256, training), kernel="general",
                    fused_ms=1.0 if batch < 256 else 4.0, graph_replays=10 if batch < 256 else 0)
               for cell in ("LSTM", "GRU") for batch in (1, 64, 256) for training in (False, True)]
    plain = [dict(r, fused_ms=3.0 if r["batch"] == 1 else 1.5, graph_replays=0) for r in general]
    line = goals.compare_graphs(general, plain)
    assert line.startswith("COMPARE  general path replayed from CUDA graphs vs launched step")
    assert "no graphs/default time median 3.00x over 8 shapes (8 faster graphed)" in line
    assert "lowest 1.50x" in line and "highest 3.00x" in line
    assert goals.compare_graphs([dict(r, graph_replays=0) for r in general], plain).startswith(
        "NO DATA  general path replayed from CUDA graphs vs launched step by step (no shape in "
        "both files replayed graphs)")
    # rows of another kernel are no comparison
    assert goals.compare_graphs(general, [dict(r, kernel="persistent") for r in plain]) \
        .startswith("NO DATA")
    paths = [tmp_path / "grid.json", tmp_path / "general.json", tmp_path / "plain.json"]
    paths[0].write_text(json.dumps({"rows": full_grid()}))
    paths[1].write_text(json.dumps({"rows": general}))
    paths[2].write_text(json.dumps({"rows": plain}))
    goals.main([str(paths[0]), "--general", str(paths[1]), "--nographs", str(paths[2])])
    assert "COMPARE  general path replayed from CUDA graphs" in capsys.readouterr().out


def test_graphs_comparison_of_the_stepwise_launches(tmp_path, capsys):
    """--stepwise-nographs: the same comparison for the stepwise rows
    (--stepwise) against the same shapes launched step by step; general-path
    rows in either file are no comparison."""
    stepwise = [dict(row(cell, "bfloat16", batch, 256, training), kernel="stepwise",
                     fused_ms=0.8, graph_replays=4)
                for cell in ("LSTM", "GRU") for batch in (1, 8) for training in (False, True)]
    plain = [dict(r, fused_ms=2.0, graph_replays=0) for r in stepwise]
    line = goals.compare_graphs(stepwise, plain, kernel="stepwise")
    assert line.startswith("COMPARE  stepwise launches replayed from CUDA graphs vs launched "
                           "step by step: no graphs/default time median 2.50x over 8 shapes")
    assert goals.compare_graphs(stepwise, plain).startswith("NO DATA  general path")
    paths = [tmp_path / "grid.json", tmp_path / "stepwise.json", tmp_path / "plain.json"]
    paths[0].write_text(json.dumps({"rows": full_grid()}))
    paths[1].write_text(json.dumps({"rows": stepwise}))
    paths[2].write_text(json.dumps({"rows": plain}))
    goals.main([str(paths[0]), "--stepwise", str(paths[1]), "--stepwise-nographs",
                str(paths[2])])
    out = capsys.readouterr().out
    assert "COMPARE  stepwise launches replayed from CUDA graphs" in out
    assert "general path replayed" not in out
