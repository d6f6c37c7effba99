"""The general path's per-step loops, and the stepwise launches, replayed
from CUDA graphs (csrc/include/fused_rnn/graphs.h): each call copies its
tensors into a cache entry's own, replays, and copies the results out (or
replays a graph captured on tensors at its own addresses).

On the CPU, FUSED_RNN_CUDA_GRAPHS=emulate runs the same cache and copies with
the loop itself in place of a replay: a driver that gave its loop a tensor
with the wrong role (an output not copied out, an input not copied in), or
whose loop reached for a tensor of the call instead of its argument, fails
parity here on the second call of a shape, whose entry still holds the first
call's data. The stepwise launches' loop (persistent.cuh's run_as_loop) is
checked the same way through the kernels' CPU emulation
(test_persistent_emulation.py, mode "graphed"). On a GPU (skipped here) the
same parity with real graphs on both paths, the automatic mode's
second-call capture, a user's capture around the ops, streams and the
cache's memory."""

import subprocess
import sys

import pytest
import torch

import fused_rnn
from helpers import (MODES, Cfg, assert_results_close, check_module_parity, convert_inputs,
                     make_module_inputs, make_module_twins, run_module, tf32_flags)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


@pytest.fixture
def emulated():
    fused_rnn.clear_cuda_graphs()
    with fused_rnn.cuda_graphs("emulate"):
        yield
    fused_rnn.clear_cuda_graphs()


def info():
    return fused_rnn.cuda_graph_cache_info()


FEATURES = {
    "base": Cfg(),
    "bidir_l2": Cfg(num_layers=2, bidirectional=True),
    "no_bias_no_hx": Cfg(bias=False, hx=False, num_layers=2),
    "packed_unsorted_bidir": Cfg(lengths=(2, 5, 1, 4, 3), enforce_sorted=False, num_layers=2,
                                 bidirectional=True),
    "packed_sorted": Cfg(lengths=(5, 3, 3, 1)),
    "unbatched": Cfg(unbatched=True, num_layers=2),
    "seq1": Cfg(seq_len=1, bidirectional=True),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("mode", MODES)
def test_emulated_parity_on_replays(emulated, mode, feature):
    """Three calls of one shape with other weights and inputs each (seeds):
    the first captures every loop (forward and backward, each direction),
    the next two replay the entries, and all three match torch.nn in
    float64, outputs, states and every gradient."""
    cfg = FEATURES[feature].replace(mode=mode)
    if mode == "LSTM_PROJ":
        cfg = cfg.replace(hidden_size=max(cfg.hidden_size, 2))
    check_module_parity(cfg, torch.float64, seed=0)
    first = info()
    calls = first["captures"] + first["replays"]  # layers of one shape share entries
    assert first["captures"] > 0
    for seed in (1, 2):
        check_module_parity(cfg, torch.float64, seed=seed)
    after = info()
    assert after["captures"] == first["captures"]
    assert after["replays"] == first["replays"] + 2 * calls


@pytest.mark.parametrize("mode", MODES)
def test_emulated_parity_float32_and_inference(emulated, mode):
    """float32 (twice torch's error) and forward-only calls (the inference
    loops, whose input projection is read and not returned) on replays."""
    cfg = Cfg(mode=mode, num_layers=2, bidirectional=True, seq_len=9, batch=3)
    for seed in (0, 1):
        check_module_parity(cfg, torch.float32, seed=seed)
    ref, fused = make_module_twins(cfg.replace(seq_len=6))
    for seed in (3, 4):
        x = torch.randn(6, 3, cfg.input_size, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected, actual = ref(x), fused(x)
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)
    assert info()["replays"] > 0


def test_emulated_across_inference_mode(emulated):
    """An entry made under inference mode serves a call outside it (its
    tensors are ordinary ones, which a copy outside inference mode may
    write), and the other way round."""
    ref, fused = make_module_twins(Cfg(mode="LSTM", seq_len=8, batch=3))
    for seed in range(4):
        x = torch.randn(8, 3, ref.input_size, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))
        context = torch.inference_mode() if seed % 2 == 0 else torch.no_grad()
        with context:
            actual, expected = fused(x)[0], ref(x)[0]
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)
    assert info()["captures"] == 1 and info()["replays"] == 3


def _call_from_threads(ref, fused, inputs, tolerance, threads=4, calls=24):
    """Each of `threads` threads calls `fused` `calls` times under no_grad on
    the inputs in turn (from its own offset); the errors of the calls whose
    output differs from `ref`'s."""
    import threading

    with torch.no_grad():
        expected = [ref(x)[0] for x in inputs]
    errors = []

    def work(offset):
        try:
            with torch.no_grad():
                for i in range(calls):
                    k = (i + offset) % len(inputs)
                    torch.testing.assert_close(fused(inputs[k])[0], expected[k], atol=tolerance,
                                               rtol=tolerance)
        except Exception as e:  # noqa: BLE001 - the caller reports it
            errors.append(e)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return errors


def test_emulated_threads_share_an_entry(emulated):
    """Threads calling one shape at once share its entry: each call's copies
    in, replay and copies out stay together (on a GPU, the same stream would
    otherwise interleave them)."""
    ref, fused = make_module_twins(Cfg(mode="GRU", seq_len=12, batch=4, hidden_size=32,
                                       input_size=16))
    inputs = [torch.randn(12, 4, 16, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(i)) for i in range(8)]
    errors = _call_from_threads(ref, fused, inputs, tolerance=1e-10)
    assert not errors, errors[0]
    # (threads that find the shape's first capture still under way capture it
    # too, the later insert winning, or past two such captures run without a
    # graph)
    state = info()
    assert state["captures"] in (1, 2)
    assert state["captures"] + state["replays"] + state["uncached"] == 4 * 24


def test_emulated_matches_without_graphs(emulated):
    """Bit for bit the loop that runs without the cache: a replay reads and
    writes copies, it computes nothing differently."""
    cfg = Cfg(mode="GRU", num_layers=2, bidirectional=True, lengths=(6, 4, 4, 1),
              enforce_sorted=False)
    _, fused = make_module_twins(cfg, torch.float32)
    inputs = make_module_inputs(cfg, torch.float32)
    run_module(fused, inputs, enforce_sorted=False)  # captures
    replayed = run_module(fused, inputs, enforce_sorted=False)
    with fused_rnn.cuda_graphs("off"):
        plain = run_module(fused, inputs, enforce_sorted=False)
    assert replayed.keys() == plain.keys()
    for key in plain:
        assert torch.equal(replayed[key], plain[key]), key


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_one_loop_per_direction_and_pass(emulated, mode):
    """A bidirectional layer runs each direction's loop once per pass (the
    pair op runs both loops itself, and its drivers then run none)."""
    _, fused = make_module_twins(Cfg(mode=mode, bidirectional=True, seq_len=5, batch=2))
    x = torch.randn(5, 2, fused.input_size, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        fused(x)
    assert info()["captures"] == 2 and info()["replays"] == 0
    fused(x)[0].sum().backward()
    # LSTM and GRU keep what backward needs in a training forward (a loop of
    # its own); an RNN's forward is the same either way
    expected = (4, 2) if mode == "RNN_TANH" else (6, 0)
    assert (info()["captures"], info()["replays"]) == expected


def _rnn_forward(model, steps):
    with torch.no_grad():
        model(torch.randn(steps, 2, 3))


def test_auto_and_off_leave_the_cpu_alone():
    """On the CPU only the emulation goes through the cache."""
    fused_rnn.clear_cuda_graphs()
    model = fused_rnn.RNN(3, 4)
    for mode in ("auto", "always", "off"):
        with fused_rnn.cuda_graphs(mode):
            for _ in range(3):
                _rnn_forward(model, 12)
    assert info() == dict(captures=0, replays=0, uncached=0, evictions=0, entries=0, bytes=0)


MAX_ENTRIES = 64  # kGraphMaxEntries


def test_cache_evicts_the_least_recently_used(emulated):
    """64 entries at most: a 65th shape evicts the oldest, which is captured
    again when it comes back, while the newest replays."""
    model = fused_rnn.RNN(3, 4)
    for steps in range(1, MAX_ENTRIES + 2):
        _rnn_forward(model, steps)
    state = info()
    assert (state["captures"], state["entries"], state["evictions"]) == (65, 64, 1)
    _rnn_forward(model, 65)
    assert info()["replays"] == 1
    _rnn_forward(model, 1)  # evicted: captured again (a second time)
    state = info()
    assert state["captures"] == 66 and state["evictions"] == 2
    # an entry's float32 tensors: xw and output (2T, 4), bias (4), h0 and
    # h_n (2, 4), W_hh (4, 4); held: T = 3..65 and 1 (2 went last)
    assert state["bytes"] == sum(4 * (2 * 8 * t + 4 + 8 + 8 + 16) for t in [*range(3, 66), 1])


def test_a_working_set_larger_than_the_cache_stops_capturing(emulated):
    """80 shapes in turn through 64 entries would be captured on every call
    (each evicts the next one due): a shape is captured twice at most, then
    runs without a graph, and the 64 shapes in the cache replay."""
    model = fused_rnn.RNN(3, 4)
    shapes = 80
    for _ in range(4):
        for steps in range(1, shapes + 1):
            _rnn_forward(model, steps)
    state = info()
    # rounds 1 and 2 capture every shape; rounds 3 and 4: T = 1..16 (evicted
    # in round 2) run without a graph, T = 17..80 replay
    expected = (2 * shapes, 2 * (shapes - MAX_ENTRIES), 2 * MAX_ENTRIES)
    assert (state["captures"], state["uncached"], state["replays"]) == expected
    assert state["entries"] == MAX_ENTRIES


ACTIONS = ["uncached", "capture direct", "capture static", "replay direct", "replay static"]
COUNTS = ["captures", "replays", "uncached", "evictions", "entries", "bytes"]


def trace(emu, calls, direct_after=2, static_after=3, entry_bytes=1000, total_bytes=10**6,
          skipped=()):
    """The cache's choices (graphs.h's GraphCache, compiled into the
    emulation extension) for calls (shape, address[, bytes]); auto's policy
    by default; the captures of the calls listed in `skipped` do not happen
    (another thread was capturing)."""
    out = emu.graph_cache_trace([c[0] for c in calls], [c[1] for c in calls],
                                [c[2] if len(c) > 2 else 100 for c in calls], direct_after,
                                static_after, entry_bytes, total_bytes, list(skipped))
    return [ACTIONS[a] for a in out[:len(calls)]], dict(zip(COUNTS, out[len(calls):]))


def test_a_skipped_capture_does_not_count(emu):
    """A capture that did not happen (on CUDA: another thread was capturing
    for the same stream; that call runs without a graph) leaves the key free
    to capture later: two skipped captures in a row, then the third call
    captures and the fourth replays (two counted captures stop a key)."""
    actions, counts = trace(emu, [(1, a) for a in (10, 20, 30, 40)], direct_after=0,
                            static_after=1, skipped=(0, 1))
    assert actions == ["capture static", "capture static", "capture static", "replay static"]
    assert counts["captures"] == 1 and counts["uncached"] == 2 and counts["replays"] == 1


def test_auto_policy_addresses_that_come_back_get_direct_entries(emu):
    """Two layers of one shape whose tensors alternate between two sets of
    addresses (a training loop's steady state): each set is captured on its
    own tensors at its second call, no memory held, then replayed."""
    actions, counts = trace(emu, [(1, a) for a in (10, 20, 10, 20, 10, 20)])
    assert actions == ["uncached", "uncached", "capture direct", "capture direct",
                       "replay direct", "replay direct"]
    assert counts["bytes"] == 0 and counts["entries"] == 2


def test_auto_policy_addresses_that_keep_changing_get_a_static_entry(emu):
    actions, counts = trace(emu, [(1, a) for a in (10, 20, 30, 40, 10)])
    assert actions == ["uncached", "uncached", "capture static", "replay static",
                       "replay static"]
    assert counts["bytes"] == 100 and counts["entries"] == 1


def test_auto_policy_direct_entries_need_no_room(emu):
    """A loop too large for a static entry still gets a direct one."""
    actions, counts = trace(emu, [(1, a, 5000) for a in (10, 20, 30, 40, 40, 40)])
    assert actions == ["uncached"] * 4 + ["capture direct", "replay direct"]
    assert counts["bytes"] == 0


def test_always_policy_and_total_bytes(emu):
    """always: a static entry at a shape's first call, whatever the
    addresses; the total limit evicts the least recently used."""
    calls = [(1, 10, 400), (1, 20, 400), (2, 30, 400), (3, 40, 400), (1, 50, 400)]
    actions, counts = trace(emu, calls, direct_after=0, static_after=1, total_bytes=900)
    assert actions == ["capture static", "replay static", "capture static", "capture static",
                       "capture static"]
    # shape 3 evicted shape 1 (used before shape 2), shape 1 coming back shape 2
    assert counts["evictions"] == 2 and counts["entries"] == 2 and counts["bytes"] == 800
    # a loop larger than the whole cache (an entry limit set above it) gets
    # no static entry and evicts nothing
    actions, counts = trace(emu, [(1, 10, 400), (2, 20, 1000)], direct_after=0,
                            static_after=1, entry_bytes=2000, total_bytes=900)
    assert actions == ["capture static", "uncached"]
    assert counts["evictions"] == 0 and counts["entries"] == 1


def test_emulated_auto_parity_when_addresses_change(emulated):
    """emulate_auto on the CPU: calls whose outputs stay alive (so the next
    call's tensors are elsewhere) get a static entry at the third call; every
    call matches torch.nn."""
    ref, fused = make_module_twins(Cfg(mode="GRU", seq_len=6, batch=2, bidirectional=True))
    kept = []
    with fused_rnn.cuda_graphs("emulate_auto"), torch.no_grad():
        for seed in range(5):
            x = torch.randn(6, 2, ref.input_size, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(seed))
            kept.append(fused(x))
            torch.testing.assert_close(kept[-1][0], ref(x)[0], atol=1e-10, rtol=1e-10)
    state = info()
    assert state["captures"] == 2 and state["bytes"] > 0  # a static entry per direction
    assert state["replays"] == 4 and state["uncached"] == 4


def test_limits(emulated):
    """An entry larger than the entry limit runs without a graph; entries
    past the total limit evict the oldest; 0 restores the defaults (on the
    CPU 64 and 256 MiB)."""
    model = fused_rnn.RNN(3, 4)
    assert fused_rnn.cuda_graph_limits("cpu") == dict(entry_bytes=64 << 20, total_bytes=256 << 20)
    size = lambda t: 4 * (2 * 8 * t + 4 + 8 + 8 + 16)  # noqa: E731 (see above)
    try:
        fused_rnn.set_cuda_graph_limits(size(10), size(10) + size(5))
        assert fused_rnn.cuda_graph_limits("cpu") == dict(entry_bytes=size(10),
                                                          total_bytes=size(10) + size(5))
        _rnn_forward(model, 11)
        assert info()["uncached"] == 1 and info()["entries"] == 0
        for steps in (10, 5):
            _rnn_forward(model, steps)
        assert info()["entries"] == 2 and info()["bytes"] == size(10) + size(5)
        _rnn_forward(model, 6)  # evicts T=10, the oldest
        assert info()["evictions"] == 1 and info()["bytes"] == size(5) + size(6)
        _rnn_forward(model, 5)
        assert info()["replays"] == 1
    finally:
        fused_rnn.set_cuda_graph_limits(0, 0)
    assert fused_rnn.cuda_graph_limits("cpu") == dict(entry_bytes=64 << 20, total_bytes=256 << 20)
    with pytest.raises(ValueError, match="must be >= 0"):
        fused_rnn.set_cuda_graph_limits(-1, 0)


def test_clear(emulated):
    model = fused_rnn.GRU(3, 4)
    _rnn_forward(model, 5)
    assert info()["entries"] == 1 and info()["bytes"] > 0
    fused_rnn.clear_cuda_graphs()
    assert info() == dict(captures=0, replays=0, uncached=0, evictions=0, entries=0, bytes=0)
    _rnn_forward(model, 5)
    assert info()["captures"] == 1


def test_mode_setting():
    previous = fused_rnn.get_cuda_graphs()
    with fused_rnn.cuda_graphs("off"):
        assert fused_rnn.get_cuda_graphs() == "off"
        with fused_rnn.cuda_graphs("always"):
            assert fused_rnn.get_cuda_graphs() == "always"
        assert fused_rnn.get_cuda_graphs() == "off"
    assert fused_rnn.get_cuda_graphs() == previous
    with pytest.raises(ValueError, match="auto, always, off, emulate, emulate_auto"):
        fused_rnn.set_cuda_graphs("sometimes")
    with pytest.raises(ValueError, match="expected one of auto, off, always, emulate, emulate_auto"):
        torch.ops.fused_rnn.set_cuda_graphs("sometimes")
    assert fused_rnn.get_cuda_graphs() == previous


def test_bad_environment_value_fails_every_call():
    code = ("import torch, fused_rnn\n"
            "try:\n"
            "    fused_rnn.RNN(3, 4)(torch.randn(2, 1, 3))\n"
            "except ValueError as e:\n"
            "    print('ValueError', e)\n")
    env = {**__import__("os").environ, "FUSED_RNN_CUDA_GRAPHS": "sometimes"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "ValueError FUSED_RNN_CUDA_GRAPHS=sometimes" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------- CUDA


@pytest.fixture
def general_cuda():
    fused_rnn.clear_cuda_graphs()
    with fused_rnn.kernel_path("general"):
        yield
    fused_rnn.clear_cuda_graphs()


@requires_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_auto_replays_a_repeated_call(general_cuda, mode):
    """auto: a training step repeated on one model replays graphs by its
    sixth call whatever torch's caching allocator does (addresses that stay:
    direct entries from the second call; that alternate between two sets:
    from the third and fourth; that keep changing: a static entry from the
    third); every call matches torch.nn in float64 (on the CPU, without
    cuDNN)."""
    cfg = Cfg(mode=mode, num_layers=2, bidirectional=True, seq_len=12, batch=3,
              lengths=(12, 9, 9))
    ref, fused = make_module_twins(cfg, torch.float64, device="cuda")
    ref = ref.cpu()
    with fused_rnn.cuda_graphs("auto"):
        for seed in range(6):
            inputs = make_module_inputs(cfg, torch.float64, "cuda", seed=seed)
            expected = run_module(ref, convert_inputs(inputs, device="cpu"))
            actual = run_module(fused, inputs)
            assert_results_close(actual, expected, what=f"{mode} call {seed}")
            if seed == 0:
                loops = info()["uncached"]  # every loop of a call, run without a graph
            if seed == 4:
                before_last = info()
    # (layers of one shape share a static entry, so captures may be fewer
    # than loops) every loop of the last call replayed
    after = info()
    assert loops > 0 and after["captures"] > 0
    assert after["uncached"] == before_last["uncached"]
    assert after["replays"] - before_last["replays"] == loops


@requires_cuda
def test_cuda_auto_static_entry_when_addresses_change(general_cuda):
    """Outputs kept alive: the next call's tensors lie elsewhere, so the
    shape gets a static entry at its third call and replays it with copies."""
    ref, fused = make_module_twins(Cfg(mode="LSTM", seq_len=10, batch=4), torch.float32,
                                   device="cuda")
    kept = []
    with fused_rnn.cuda_graphs("auto"), torch.no_grad(), tf32_flags(cudnn=False, matmul=False):
        for _ in range(5):
            x = torch.randn(10, 4, ref.input_size, device="cuda")
            kept.append(fused(x)[0])
            torch.testing.assert_close(kept[-1], ref(x)[0], atol=1e-5, rtol=1e-5)
    assert info()["bytes"] > 0 and info()["replays"] >= 2


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_replays_in_every_dtype(general_cuda, mode, dtype):
    cfg = Cfg(mode=mode, input_size=16, hidden_size=64, seq_len=20, batch=8,
              bidirectional=True)
    with fused_rnn.cuda_graphs("always"), tf32_flags(cudnn=False, matmul=False):
        for seed in (0, 1):
            check_module_parity(cfg, dtype, device="cuda", seed=seed)
    assert info()["replays"] > 0


@requires_cuda
def test_cuda_auto_skips_short_and_large_loops(general_cuda):
    model = fused_rnn.LSTM(8, 16).cuda()
    with fused_rnn.cuda_graphs("auto"), torch.no_grad():
        for _ in range(3):
            model(torch.randn(7, 2, 8, device="cuda"))  # 7 steps: under the 8 a graph needs
    assert info()["captures"] == 0 and info()["uncached"] == 0
    big = fused_rnn.LSTM(16, 2048).cuda()  # 64 x 8192 x 2048 = 2^30 multiply-adds per step
    with fused_rnn.cuda_graphs("auto"), torch.no_grad():
        for _ in range(3):
            big(torch.randn(8, 64, 16, device="cuda"))
    assert info()["captures"] == 0


@requires_cuda
def test_cuda_streams_keep_their_own_entries(general_cuda):
    """The same shape on two streams: an entry per stream, each replayed in
    its stream's order, results as on the default stream."""
    ref, fused = make_module_twins(Cfg(mode="GRU", seq_len=10, batch=4), torch.float32,
                                   device="cuda")
    x = [torch.randn(10, 4, ref.input_size, device="cuda") for _ in range(4)]
    with fused_rnn.cuda_graphs("always"), torch.no_grad(), tf32_flags(cudnn=False, matmul=False):
        expected = [ref(v)[0] for v in x]
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        outs = []
        for i, v in enumerate(x):
            s = streams[i % 2]
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                outs.append(fused(v)[0])
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert info()["entries"] == 2 and info()["replays"] == 2


@requires_cuda
@pytest.mark.parametrize("graphs", ["always", "auto"])
def test_cuda_threads_on_one_stream(general_cuda, graphs):
    """Four threads calling one shape on the same (default) stream: each
    call's copies, replay and copies out stay together, so every result is
    its own input's."""
    ref, fused = make_module_twins(Cfg(mode="GRU", seq_len=12, batch=4, hidden_size=32,
                                       input_size=16), torch.float32, device="cuda")
    inputs = [torch.randn(12, 4, 16, device="cuda") for _ in range(8)]
    with fused_rnn.cuda_graphs(graphs), tf32_flags(cudnn=False, matmul=False):
        errors = _call_from_threads(ref, fused, inputs, tolerance=1e-5)
    assert not errors, errors[0]
    assert info()["replays"] > 0


@requires_cuda
def test_cuda_user_capture_records_the_loop_itself(general_cuda):
    """Inside the caller's torch.cuda.graph the ops launch their steps into
    that capture (no nested capture); after it, their own graph replays."""
    cfg = Cfg(mode="LSTM", seq_len=10, batch=4, input_size=8, hidden_size=32)
    _, model = make_module_twins(cfg, torch.float32, device="cuda")
    x = torch.randn(10, 4, 8, device="cuda")
    with fused_rnn.cuda_graphs("always"), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(x)
        torch.cuda.current_stream().wait_stream(side)
        before = info()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, _ = model(x)
        assert info()["captures"] == before["captures"]
        assert info()["replays"] == before["replays"]
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            expected, _ = model(x)
            torch.testing.assert_close(static_out, expected, atol=1e-6, rtol=1e-6)


@requires_cuda
def test_cuda_cache_memory_is_released(general_cuda):
    model = fused_rnn.GRU(32, 256).cuda()
    with fused_rnn.cuda_graphs("always"), torch.no_grad():
        model(torch.randn(64, 16, 32, device="cuda"))
    torch.cuda.synchronize()
    projection = 64 * 16 * 3 * 256 * 4  # the static copy of the input projection
    held = torch.cuda.memory_allocated()
    assert info()["bytes"] >= projection  # (and the graph's pool)
    fused_rnn.clear_cuda_graphs()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= held - projection


@requires_cuda
@pytest.mark.parametrize("graphs", ["off", "auto"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
def test_cuda_bidirectional_loops_side_by_side(general_cuda, mode, graphs):
    """Both directions' loops of a layer on two streams (launched step by
    step, or replayed from graphs): parity with torch.nn on every call, the
    joined results used by the next layer and by backward."""
    cfg = Cfg(mode=mode, num_layers=2, bidirectional=True, seq_len=16, batch=5, input_size=12,
              hidden_size=48)
    with fused_rnn.cuda_graphs(graphs), tf32_flags(cudnn=False, matmul=False):
        for seed in range(3):
            check_module_parity(cfg, torch.float32, device="cuda", seed=seed)
    if graphs == "auto":
        assert info()["replays"] > 0
    text = fused_rnn.explain_kernel_path(mode, 48, batch=5, bidirectional=True)
    assert text.endswith("the two directions' loops run side by side, on two CUDA streams")


@requires_cuda
def test_cuda_limits_follow_the_device_memory():
    memory = torch.cuda.get_device_properties(0).total_memory
    assert fused_rnn.cuda_graph_limits("cuda") == dict(
        entry_bytes=max(64 << 20, memory // 256), total_bytes=max(256 << 20, memory // 64))


@requires_cuda
def test_cuda_explain_says_when_graphs_replay():
    with fused_rnn.kernel_path("general"):
        with fused_rnn.cuda_graphs("auto"):
            text = fused_rnn.explain_kernel_path("LSTM", 256, batch=8)
            assert "replayed from a CUDA graph from a shape's second call" in text
            text = fused_rnn.explain_kernel_path("LSTM", 2048, batch=64)
            assert "runs without a CUDA graph" in text
        with fused_rnn.cuda_graphs("off"):
            assert "CUDA graphs: off" in fused_rnn.explain_kernel_path("GRU", 256, batch=8)
    with fused_rnn.kernel_path("stepwise"), fused_rnn.cuda_graphs("auto"):
        text = fused_rnn.explain_kernel_path("GRU", 256, batch=8)
        assert text.startswith("stepwise kernels")
        assert "its loop of launches (one per step) is replayed from a CUDA graph" in text


@pytest.fixture
def stepwise_cuda():
    fused_rnn.clear_cuda_graphs()
    with fused_rnn.kernel_path("stepwise"):
        yield
    fused_rnn.clear_cuda_graphs()


@requires_cuda
@pytest.mark.parametrize("feature", ["base", "bidir_l2", "packed_unsorted_bidir",
                                     "no_bias_no_hx"])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_stepwise_launches_replayed(stepwise_cuda, mode, feature):
    """The stepwise launches (the persistent kernels' code, one launch per
    step; both directions of a layer in each launch) captured at a shape's
    first call and replayed by the next two with other weights and inputs:
    float64 parity with torch.nn on every call, forward and backward, dense
    and packed."""
    cfg = FEATURES[feature].replace(mode=mode)
    if mode == "LSTM_PROJ":
        cfg = cfg.replace(hidden_size=max(cfg.hidden_size, 2))
    with fused_rnn.cuda_graphs("always"):
        for seed in range(3):
            check_module_parity(cfg, torch.float64, device="cuda", seed=seed)
    assert info()["captures"] > 0 and info()["replays"] >= 2 * info()["captures"]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_stepwise_auto_replays_in_low_precision(stepwise_cuda, dtype):
    """auto: a repeated training step replays the stepwise launches by its
    sixth call, whatever addresses the caching allocator gives (see
    test_cuda_auto_replays_a_repeated_call); each call within twice torch's
    error."""
    cfg = Cfg(mode="LSTM", input_size=16, hidden_size=64, seq_len=12, batch=8,
              bidirectional=True)
    with fused_rnn.cuda_graphs("auto"), tf32_flags(cudnn=False, matmul=False):
        for seed in range(6):
            check_module_parity(cfg, dtype, device="cuda", seed=seed)
    assert info()["replays"] > 0
