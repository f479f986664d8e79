"""A step's decode rows and a prompt in one run (runtime/unified.py) against the two runs apart: the engine's costs,
then the served traffic of bench_adapters_scale.py with and without it (its exports and adapters, built there if
missing).

    python benchmarks/bench_unified_steps.py [--precisions int8 fp32 int4] [--parts engine traffic] [--rounds 2]
        [--unique 100] [--workdir /tmp/ortlora-scale-adapters]

engine: Qwen2.5-0.5B shape, 16 slots, rank-16 all-linear adapters, decode rows over 40-token pasts: (1) a decode
    step alone, in an engine whose graph has the prompt group and in one without (the scratch prompt token's cost);
    (2) a decode step of D rows plus a fresh prompt of P tokens, as one run (`Engine.step`) and as the two runs
    apart (`run`, then `decode`). Interleaved rounds, medians of each round's repeats; every round's figure shown.
traffic: the closed-loop traffic of bench_adapters_scale.py (8 and 1,000 adapters), one fresh server a run, with
    and without `--separate-prompt-runs`, the four alternating in each round: tok/s, prompt runs, merged runs.
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
        cases = [(d, p) for d in (4, 15) for p in (16, 64)]
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for label, (engine, loaded) in engines.items():
                decode = [Row(s, [7], loaded[s % 8]) for s in range(15)]
                times.setdefault(f"decode 15 rows, {label} graph", []).append(
                    _median(lambda: _undo(engine, decode, []) or engine.decode(decode), args.repeats))
                for d, p in cases:
                    rows = decode[:d]
                    prompt = [Row(15, rng.integers(0, 1000, p).tolist(), loaded[3], 1)]
                    if label == "one run":
                        fn = lambda: (_undo(engine, rows, prompt), engine.step(rows, prompt))  # noqa: E731
                    else:
                        fn = lambda: (_undo(engine, rows, prompt), engine.run(prompt), engine.decode(rows))  # noqa: E731
                    times.setdefault(f"{d} decode rows + {p}-token prompt, {label}", []).append(
                        _median(fn, args.repeats))
        out = {k: {"ms_per_round": [round(1e3 * t, 1) for t in v], "ms_median": round(1e3 * statistics.median(v), 1)}
               for k, v in times.items()}
        results[f"engine {precision}"] = out
        for k, v in out.items():
            print(f"{precision}: {k}: {v['ms_per_round']} ms", flush=True)
        del engines


def _undo(engine, rows, prompt) -> None:
    """The slots as before the timed call: decode rows back to their past, the prompt's slot empty."""
    for r in rows:
        engine.lengths[r.slot] = 40
    for r in prompt:
        engine.lengths[r.slot] = 0


def _median(fn, repeats: int) -> float:
    fn()  # warm: onnxruntime plans memory for the shapes
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def traffic_part(args, folders, peft_root, names, results) -> None:
    from ortlora.model_folder import ModelInfo

    work = Path(args.workdir)
    ranks = scale.zipf_choices(len(names), args.requests)
    order = list(range(len(names)))
    random.Random(2).shuffle(order)  # as bench_adapters_scale.traffic
    traffics = {"8": [names[order[k % 8]] for k in ranks], str(len(names)): [names[order[k]] for k in ranks]}
    modes = {"one run": "", "two runs": "--separate-prompt-runs"}
    for precision, folder in folders.items():
        adapters = scale.onnx_adapters(folder, peft_root, names, work)
        batch = scale.prompts(args.requests, args.prompt, ModelInfo.read(folder).vocab_size)
        got: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            runs = [(t, m) for t in traffics for m in modes]
            for t, m in runs if r % 2 == 0 else runs[::-1]:
                args.server_args = modes[m]
                s = scale._one_traffic(args, folder, adapters, traffics[t], batch,
                                       work / f"serve-unified-{precision}-{t}.log")
                got.setdefault(f"{t} adapters, {m}", []).append(s)
                scale._print(f"ortlora {precision} {t} adapters, {m} (round {r + 1})",
                             {k: s[k] for k in ("tok/s", "prompt_runs", "prompt_runs_merged", "decode_steps")})
        summary = {k: {"tok_s": [round(s["tok/s"], 1) for s in v], "prompt_runs": [s["prompt_runs"] for s in v],
                       "merged": [s["prompt_runs_merged"] for s in v]} for k, v in got.items()}
        for t in traffics:
            summary[f"{t} adapters: one run / two runs"] = [
                round(a["tok/s"] / b["tok/s"], 3) for a, b in zip(got[f"{t} adapters, one run"],
                                                                   got[f"{t} adapters, two runs"])]
        summary["1,000 / 8 per round, one run"] = [
            round(a["tok/s"] / b["tok/s"], 3) for a, b in zip(got[f"{len(names)} adapters, one run"],
                                                               got["8 adapters, one run"])]
        results[f"traffic {precision}"] = summary
        scale._print(f"ortlora {precision}", summary)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ortlora-scale-adapters")
    p.add_argument("--source", default=None, help="where the random checkpoint is built (default: workdir)")
    p.add_argument("--precisions", nargs="+", default=["int8", "fp32", "int4"])
    p.add_argument("--parts", nargs="+", default=["engine", "traffic"], choices=["engine", "traffic"])
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--unique", type=int, default=None, help="distinct adapter files (default: all)")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--max-loaded", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="engine: timed calls per case and round")
    p.add_argument("--tiny", action="store_true", help="a tiny random llama instead (smoke runs)")
    args = p.parse_args()
    args.unique = args.unique or args.adapters
    args.server_args = ""
    _, folders, peft_root, names = scale.prepare(args)
    results: dict = {"args": vars(args)}
    if "engine" in args.parts:
        engine_part(args, folders, peft_root, names, results)
    if "traffic" in args.parts:
        traffic_part(args, folders, peft_root, names, results)
    (Path(args.workdir) / "results-unified.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
