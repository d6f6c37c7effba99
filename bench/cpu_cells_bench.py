"""The cells (LSTMCell, GRUCell, RNNCell) on the CPU, one step per call as a
decoder or an RL policy calls them: fused_rnn against torch.nn side by side
in one process, 1 thread, inference (no_grad, one call) and training (a loop
of 20 steps, then backward). Medians of 7 timings of many calls.

    python bench/cpu_cells_bench.py
"""

import time

import torch

import fused_rnn


def median_us(fn, calls, repeats=7):
    for _ in range(max(calls // 10, 5)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(times)[len(times) // 2]


def loop(cell, x, hx, steps=20):
    def run():
        state = hx
        for _ in range(steps):
            state = cell(x, state)
        (state[0] if isinstance(state, tuple) else state).sum().backward()
    return run


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"{'cell':9} {'H':>4} {'B':>3}  {'mode':22} {'torch us':>9} {'fused us':>9} {'speedup':>8}")
    for name in ("LSTMCell", "GRUCell", "RNNCell"):
        for hidden, batch in ((32, 1), (256, 16)):
            ref = getattr(torch.nn, name)(hidden, hidden)
            fused = getattr(fused_rnn, name)(hidden, hidden)
            fused.load_state_dict(ref.state_dict())
            x = torch.randn(batch, hidden, requires_grad=True)
            h = torch.randn(batch, hidden)
            hx = (h, torch.randn(batch, hidden)) if name == "LSTMCell" else h
            with torch.no_grad():
                t_ref = median_us(lambda: ref(x, hx), 2000)
                t_fused = median_us(lambda: fused(x, hx), 2000)
            rows = [("inference, one call", t_ref, t_fused)]
            rows.append(("training, 20 steps", median_us(loop(ref, x, hx), 50),
                         median_us(loop(fused, x, hx), 50)))
            for mode, a, b in rows:
                print(f"{name:9} {hidden:>4} {batch:>3}  {mode:22} {a:9.1f} {b:9.1f} {a / b:7.2f}x")


if __name__ == "__main__":
    main()
