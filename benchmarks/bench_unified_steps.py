"""A step's decode rows and a prompt in one run (runtime/unified.py) against the two runs apart: the engine's costs,
then the served traffic of bench_adapters_scale.py with and without it (its exports and adapters, built there if
missing).

    python benchmarks/bench_unified_steps.py [--precisions int8 fp32 int4] [--parts engine traffic] [--rounds 2]
        [--unique 100] [--workdir /tmp/ortlora-scale-adapters]

engine: Qwen2.5-0.5B shape, 16 slots, the 8 largest adapters of the mix (all-linear rank 16), decode rows over
    40-token pasts: (1) a decode step alone, in an engine whose graph has the prompt group and in one without (the
    scratch prompt token's cost); (2) a decode step of D rows plus a fresh prompt of P tokens, as one run
    (`Engine.step`) and as the two runs apart (`run`, then `decode`). The two engines alternate call by call; the
    median of each round's calls, every round shown.
traffic: the closed-loop traffic of bench_adapters_scale.py (8 and 1,000 adapters), one fresh server a run, with
    and without `--unified-steps`, the four alternating in each round: tok/s, prompt runs, merged runs;
prefill: packed prompt runs alone (16 x 32, 4 x 128, 1 x 32 tokens) in both engines: what the prompt group costs a
    run that has no decode rows.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_adapters_scale as scale  # noqa: E402


def engine_part(args, folders, peft_root, names, results) -> None:
    from ortlora.runtime.adapters import Adapters
    from ortlora.runtime.engine import Engine, Row

    work = Path(args.workdir)
    rng = np.random.default_rng(0)
    for precision, folder in folders.items():
        adapters = scale.onnx_adapters(folder, peft_root, names, work)
        files = sorted({(adapters / f"{n}.onnx_adapter").resolve() for n in names}, key=lambda f: -f.stat().st_size)
        engines = {}
        for label, merge in (("one run", True), ("two runs", False)):
            engine = Engine(folder, slots=16, max_len=256, prefix_cache_bytes=0, unified_steps=merge)
            store = Adapters.for_engine(engine, capacity=64)
            loaded = [store.load(f) for f in files[:8]]
            vocab = engine.info.vocab_size
            for s in range(15):  # 15 decode rows over 40-token pasts, 8 adapters among them
                engine.run([Row(s, rng.integers(0, vocab, 40).tolist(), loaded[s % 8], 1)])
            engines[label] = (engine, loaded)
        cases = [(15, 0)] + [(d, p) for d in (4, 15) for p in (16, 64)]
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for d, p in cases:  # the two engines alternate call by call: the machine's drift hits both alike
                calls = {label: _call(engine, loaded, d, p, rng) for label, (engine, loaded) in engines.items()}
                for fn in calls.values():
                    fn()  # warm: onnxruntime plans memory for the shapes
                got: dict[str, list[float]] = {label: [] for label in calls}
                for _ in range(args.repeats):
                    for label, fn in calls.items():
                        t0 = time.perf_counter()
                        fn()
                        got[label].append(time.perf_counter() - t0)
                case = f"{d} decode rows" + (f" + {p}-token prompt" if p else "")
                for label, ts in got.items():
                    times.setdefault(f"{case}, {label}", []).append(statistics.median(ts))
        for _ in range(args.rounds):  # prompt runs alone: what the prompt group costs a run without decode rows
            for n, w in ((16, 32), (4, 128), (1, 32)):
                calls = {label: _prefill_call(engine, loaded, n, w, rng) for label, (engine, loaded) in engines.items()}
                for fn in calls.values():
                    fn()
                got = {label: [] for label in calls}
                for _ in range(args.repeats):
                    for label, fn in calls.items():
                        t0 = time.perf_counter()
                        fn()
                        got[label].append(time.perf_counter() - t0)
                for label, ts in got.items():
                    times.setdefault(f"prompt run {n} x {w} tokens alone, {label} graph", []).append(
                        statistics.median(ts))
        out = {k: {"ms_per_round": [round(1e3 * t, 1) for t in v], "ms_median": round(1e3 * statistics.median(v), 1)}
               for k, v in times.items()}
        results[f"engine {precision}"] = out
        for k, v in out.items():
            print(f"{precision}: {k}: {v['ms_per_round']} ms", flush=True)
        del engines


def _call(engine, loaded, d: int, p: int, rng):
    """A timed call: d decode rows (and a fresh p-token prompt in the slot after them) as the engine runs them,
    the slots put back as they were first."""
    from ortlora.runtime.engine import Row

    rows = [Row(s, [7], loaded[s % 8]) for s in range(d)]
    prompt = [Row(15, rng.integers(0, 1000, p).tolist(), loaded[3], 1)] if p else []

    def call():
        for r in rows:  # decode rows back to their 40-token past, the prompt's slot empty
            engine.lengths[r.slot] = 40
        engine.lengths[15] = 0
        if not prompt:
            engine.decode(rows)
        elif engine.unified:
            engine.step(rows, prompt)
        else:
            engine.run(prompt)
            engine.decode(rows)
    return call


def _prefill_call(engine, loaded, n: int, w: int, rng):
    """A timed call: n fresh prompts of w tokens (the 8 adapters in turn) packed in one run."""
    from ortlora.runtime.engine import Row

    rows = [Row(s, rng.integers(0, 1000, w).tolist(), loaded[s % 8], 1) for s in range(n)]

    def call():
        engine.lengths[:n] = 0
        engine.run(rows)
    return call


def traffic_part(args, folders, peft_root, names, results) -> None:
    from ortlora.model_folder import ModelInfo

    work = Path(args.workdir)
    ranks = scale.zipf_choices(len(names), args.requests)
    order = list(range(len(names)))
    random.Random(2).shuffle(order)  # as bench_adapters_scale.traffic
    traffics = {"8": [names[order[k % 8]] for k in ranks], str(len(names)): [names[order[k]] for k in ranks]}
    if args.many_only:
        del traffics["8"]
    modes = {"one run": "--unified-steps", "two runs": ""}
    for precision, folder in folders.items():
        adapters = scale.onnx_adapters(folder, peft_root, names, work)
        batch = scale.prompts(args.requests, args.prompt, ModelInfo.read(folder).vocab_size,
                              range_ratio=args.range_ratio)
        got: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            runs = [(t, m) for t in traffics for m in modes]
            for t, m in runs if r % 2 == 0 else runs[::-1]:
                s = scale._one_traffic(args, folder, adapters, traffics[t], batch,
                                       work / f"serve-unified-{precision}-{t}.log", tuple(modes[m].split()))
                got.setdefault(f"{t} adapters, {m}", []).append(s)
                scale._print(f"ortlora {precision} {t} adapters, {m} (round {r + 1})",
                             {k: s[k] for k in ("tok/s", "prompt_runs", "prompt_runs_merged", "decode_steps")})
        summary = {k: {"tok_s": [round(s["tok/s"], 1) for s in v], "prompt_runs": [s["prompt_runs"] for s in v],
                       "merged": [s["prompt_runs_merged"] for s in v]} for k, v in got.items()}
        for t in traffics:
            summary[f"{t} adapters: one run / two runs"] = [
                round(a["tok/s"] / b["tok/s"], 3) for a, b in zip(got[f"{t} adapters, one run"],
                                                                   got[f"{t} adapters, two runs"])]
        if "8" in traffics:
            summary["1,000 / 8 per round, one run"] = [
                round(a["tok/s"] / b["tok/s"], 3) for a, b in zip(got[f"{len(names)} adapters, one run"],
                                                                   got["8 adapters, one run"])]
        results[f"traffic {precision}"] = summary
        scale._print(f"ortlora {precision}", summary)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scale.traffic_arguments(p)
    p.add_argument("--precisions", nargs="+", default=["int8", "fp32", "int4"])
    p.add_argument("--parts", nargs="+", default=["engine", "traffic"], choices=["engine", "traffic"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="engine: timed calls per case and round")
    p.add_argument("--many-only", action="store_true", help="traffic: only the --adapters traffic, not the 8")
    args = p.parse_args()
    args.unique = args.unique or args.adapters
    _, folders, peft_root, names = scale.prepare(args)
    results: dict = {"args": vars(args)}
    if "engine" in args.parts:
        engine_part(args, folders, peft_root, names, results)
    if "traffic" in args.parts:
        traffic_part(args, folders, peft_root, names, results)
    (Path(args.workdir) / "results-unified.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
