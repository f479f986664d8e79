"""The engine's step costs behind the step budget and packing, on the random Qwen2.5-0.5B shape (no HTTP).

    python benchmarks/bench_steps.py [--precisions fp32 int4] [--rounds 3] [--parts runs unified workloads] [--smoke]

runs:      a prefill run's fixed and per-token cost (one row of 8 / 64 / 256 tokens), 16 x 32-token prompts in one
           packed run vs one run each, and decode steps of 4 and 16 rows (8 rank-16 adapters over the rows).
unified:   one step of B decoding rows + one prompt chunk of S tokens, as two runs (a decode run, a prefill run:
           what the engine does) vs the shape a single run would need (GroupQueryAttention pads every row of a run to
           its longest: (B + 1) rows x S, timed as a packed run of that shape; onnxruntime refuses the real one, rows
           with a past and S > 1 in one batch).
workloads: engine-level generation (a Batch stepped directly, calibrated as a server is) of bench_vllm.py's
           workloads: a burst of 16 x 32-token prompts (64 new), 16 x 512-token prompts (32 new), one stream (32-token
           prompt, 128 new): generated tok/s (prompt + generated for the long prompts), TTFT median, per precision.

Interleaved rounds in one process; the minimum of the rounds is printed (load only ever slows a run down).
`--smoke` shrinks everything to check the script runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import prepare  # noqa: E402


def _engine(folder: Path, adapters_dir: Path, slots: int):
    from ortlora.runtime.adapters import Adapters
    from ortlora.runtime.engine import Engine

    engine = Engine(folder, slots=slots, max_len=2048, prefix_cache_bytes=0)
    store = Adapters.for_engine(engine)
    adapters = [store.load(adapters_dir / f"a{i}.onnx_adapter", name=f"a{i}") for i in range(8)]
    if engine.hugepages_thread is not None:
        engine.hugepages_thread.join()
    return engine, store, adapters


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def runs(engine, adapters, scale: int) -> dict[str, float]:
    from ortlora.runtime.engine import Row

    rng = np.random.default_rng(0)
    toks = lambda n: rng.integers(10, 1000, n).tolist()  # noqa: E731

    def clear():
        engine.lengths[:] = 0

    out = {}
    for n in (8, 64 // scale, 256 // scale):
        clear()
        out[f"prefill 1x{n}"] = _timed(lambda: engine.run([Row(0, toks(n), adapters[0])]))
    w = 32 // scale
    clear()
    out[f"prefill 16x{w} packed"] = _timed(lambda: engine.run([Row(s, toks(w), adapters[s % 8]) for s in range(16)]))
    clear()
    out[f"prefill 16x{w} one by one"] = _timed(lambda: [engine.run([Row(s, toks(w), adapters[s % 8])])
                                                        for s in range(16)])
    for rows in (4, 16):
        clear()
        engine.run([Row(s, toks(64 // scale), adapters[s % 8]) for s in range(rows)])
        out[f"decode {rows} rows"] = min(_timed(lambda: engine.decode([Row(s, [5], adapters[s % 8])
                                                                       for s in range(rows)])) for _ in range(3))
    return out


def unified(engine, adapters, scale: int) -> dict[str, float]:
    """Two runs (decode B rows, prefill one chunk of S) vs a run of the shape one unified run would have."""
    from ortlora.runtime.engine import Row

    rng = np.random.default_rng(1)
    out = {}
    for rows, width in ((4, 32 // scale), (4, 128 // scale), (16, 32 // scale)):
        engine.lengths[:] = 0
        engine.run([Row(s, rng.integers(10, 1000, 64 // scale).tolist(), adapters[s % 8]) for s in range(rows)])
        chunk = rng.integers(10, 1000, width).tolist()
        two = _timed(lambda: engine.decode([Row(s, [5], adapters[s % 8]) for s in range(rows)]))
        two += _timed(lambda: engine.run([Row(rows, chunk, adapters[0])]))
        engine.lengths[:rows + 1] = 0
        one = _timed(lambda: engine.run([Row(s, chunk, adapters[s % 8]) for s in range(rows + 1)]))
        out[f"{rows} decoding + {width}-token chunk: two runs"] = two
        out[f"{rows} decoding + {width}-token chunk: one padded run"] = one
    return out


def workloads(model, scale: int) -> dict[str, dict[str, float]]:
    from ortlora.runtime.batch import Batch
    from ortlora.runtime.request import Request
    from ortlora.runtime.sampling import SamplingParams

    out = {}
    for name, (n, prompt, new, count_prompt) in {"burst": (16, 32, 64, False), "long": (16, 512, 32, True),
                                                  "stream": (1, 32, 128, False)}.items():
        n, prompt, new = max(1, n // scale), max(4, prompt // scale), max(4, new // scale)
        batch = Batch(model.engine, model.adapters)
        batch.calibrate()
        rng = np.random.default_rng(2)
        reqs = [Request(rng.integers(10, 300, prompt).tolist(), SamplingParams(max_new_tokens=new, ignore_eos=True),
                        model.tokenizer, model.adapters.acquire(f"a{i % 8}")) for i in range(n)]
        first: dict[int, float] = {}
        t0 = time.perf_counter()
        for r in reqs:
            batch.add(r)
        while batch:
            for req, _ in batch.step():
                first.setdefault(id(req), time.perf_counter() - t0)
        wall = time.perf_counter() - t0
        tokens = sum(len(r.token_ids) for r in reqs) + (n * prompt if count_prompt else 0)
        out[name] = {"tok_s": tokens / wall, "ttft_p50": statistics.median(first.values())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/ortlora-bench-steps")
    ap.add_argument("--source", default="/tmp/ortlora-bench-generate", help="checkpoint + exports (shared)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4"])
    ap.add_argument("--parts", nargs="+", default=["runs", "unified", "workloads"],
                    choices=["runs", "unified", "workloads"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: proves the script runs, measures nothing")
    args = ap.parse_args()
    work, source = Path(args.workdir), Path(args.source)
    work.mkdir(parents=True, exist_ok=True)
    scale = 8 if args.smoke else 1
    _, _, folders, adapter_dirs = prepare(source, work, list(args.precisions))
    from ortlora.runtime.model import Model

    engines = {p: _engine(folders[p], adapter_dirs[p], 17) for p in args.precisions}
    models = {}
    if "workloads" in args.parts:
        for p in args.precisions:
            models[p] = Model(folders[p], slots=16, max_len=1024, prefix_cache_bytes=0)
            for i in range(8):
                models[p].adapters.load(adapter_dirs[p] / f"a{i}.onnx_adapter", name=f"a{i}")
    results: dict[tuple[str, str], list[float]] = {}
    wl: dict[str, list[dict]] = {p: [] for p in args.precisions}
    for k in range(args.rounds):
        for p in args.precisions if k % 2 == 0 else reversed(args.precisions):
            engine, _, adapters = engines[p]
            for part in ("runs", "unified"):
                if part in args.parts:
                    for name, secs in globals()[part](engine, adapters, scale).items():
                        results.setdefault((p, name), []).append(secs)
            if "workloads" in args.parts:
                wl[p].append(workloads(models[p], scale))
    note = " (smoke settings: not a measurement)" if args.smoke else ""
    print(f"min of {args.rounds} interleaved rounds, seconds{note}")
    for name in dict.fromkeys(n for _, n in results):
        print(f"  {name:44s} " + "  ".join(f"{p} {min(results[p, name]):7.3f}" for p in args.precisions))
    for p in args.precisions:
        r = {n: min(results[p, n]) for q, n in results if q == p}
        if "prefill 1x8" in r:
            big = max((n for n in r if n.startswith("prefill 1x")), key=lambda n: int(n.split("x")[1]))
            per = (r[big] - r["prefill 1x8"]) / (int(big.split("x")[1]) - 8)
            print(f"  {p}: a run's fixed part {1000 * (r['prefill 1x8'] - 8 * per):.0f} ms, {1000 * per:.2f} ms a "
                  f"token")
    for p, rounds in wl.items():
        for name in rounds[0] if rounds else ():
            best = max((x[name] for x in rounds), key=lambda x: x["tok_s"])
            print(f"  {p} {name:6s} {best['tok_s']:7.1f} tok/s, TTFT median {best['ttft_p50']:.2f} s{note}")


if __name__ == "__main__":
    main()
