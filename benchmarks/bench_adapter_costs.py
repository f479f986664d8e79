"""What one cold adapter and one distinct adapter in a step cost the engine (issue 28), no server: the adapters and
exports of bench_adapters_scale.py (built there if missing).

    python benchmarks/bench_adapter_costs.py [--precisions int8 fp32] [--rounds 2] [--unique 100] [--parts engine classes]
        [--workdir /tmp/ortlora-scale-adapters]

load: one adapter file's CPU as the server reads it (one private read into one allocation) against mapping the file
    and copying each tensor, the finite check included; the median over 24 files of the mix.
step: a 16-row decode step against the distinct adapters it binds (1, 4, 8, 13, 16 of the largest files: all-linear
    rank 16, every pool slot full); min and median over interleaved rounds.
classes: the pool's slots per module class (this tree) against every module in one class (the layout before it: an
    attention-only adapter's slot also ran the MLP's LoRA over zeros), two engines in one process, steps alternating:
    16-row decode steps over k distinct adapters of the mix's four kinds (attention-only / all-linear x rank 8 / 16);
    min and median ms, and the median of the per-step ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_adapters_scale import _print, onnx_adapters, prepare  # noqa: E402


def engine_costs(args, folders, peft_root, names, results) -> None:
    """No server: (1) one load's CPU, the file read as the server reads it (one private read) against a mapping
    plus a copy per tensor, with the finite check; (2) a 16-row decode step with k distinct adapters bound (the
    largest files: all-linear rank 16, every slot full)."""
    from ortlora.adapters.onnx_adapter import open_onnx_adapter
    from ortlora.adapters.validate import model_feeds
    from ortlora.runtime.adapters import Adapters
    from ortlora.runtime.engine import Engine, Row

    work = Path(args.workdir)
    for precision, folder in folders.items():
        adapters = onnx_adapters(folder, peft_root, names, work)
        files = sorted({(adapters / f"{n}.onnx_adapter").resolve() for n in names}, key=lambda f: -f.stat().st_size)
        engine = Engine(folder, slots=16, max_len=256, prefix_cache_bytes=0)
        store = Adapters.for_engine(engine, capacity=64)
        inputs = store.reader.lora_inputs

        def mapped(f):
            feeds = model_feeds(open_onnx_adapter(f).params, inputs, "x")
            return {k: np.array(v, copy=True) for k, v in feeds.items()}

        def private(f):
            return model_feeds(open_onnx_adapter(f, private=True).params, inputs, "x")

        def finite(feeds):
            return all(np.isfinite(v).all() for v in feeds.values())

        out = {}
        sample = files[::max(1, len(files) // 24)][:24]
        for label, read in (("mapped + copies", mapped), ("one private read", private)):
            times = []
            for r in range(args.rounds + 1):
                for f in sample:
                    t0 = time.perf_counter()
                    finite(read(f))
                    times.append(time.perf_counter() - t0)
            out[f"load ms ({label}, mean {np.mean([f.stat().st_size for f in sample]) / 1e6:.1f} MB)"] = \
                statistics.median(times) * 1e3
        big = [store.load(f, name=f"e{i}") for i, f in enumerate(files[:16])]
        if engine.hugepages_thread is not None:
            engine.hugepages_thread.join()
        rng = np.random.default_rng(0)
        for s in range(16):
            engine.prefill([Row(s, rng.integers(10, min(1000, engine.info.vocab_size), 32).tolist(), big[s])])

        def step(adapters_of_rows):
            engine.lengths[:16] = 40
            engine.decode([Row(s, [5], a) for s, a in enumerate(adapters_of_rows)])

        cases = {f"decode 16 rows, {k} adapters": [big[s % k] for s in range(16)] for k in (1, 4, 8, 13, 16)}
        times = {c: [] for c in cases}
        for _ in range(3 * args.rounds + 2):
            for c, rows in cases.items():
                step(rows)
                t0 = time.perf_counter()
                step(rows)
                times[c].append(time.perf_counter() - t0)
        out.update({f"{c} ms (min / median)": [round(min(t) * 1e3, 1), round(statistics.median(t) * 1e3, 1)]
                    for c, t in times.items()})
        pool = engine.pool
        out["pool slot MB"] = sum(b[1].nbytes for run in pool.runs for b in run.buffers.values()) / 1e6
        out["slots of the 16 adapters, per module class"] = [sorted(run.where[a.uid] for a in big if a.uid in run.where)
                                                             for run in pool.runs]
        results[f"engine {precision}"] = out
        _print(f"engine {precision}", out)


def class_costs(args, folders, peft_root, names, results) -> None:
    """Per-class slots against one class (module_classes patched while the second engine and its pool are made)."""
    from ortlora.runtime import engine as engine_mod
    from ortlora.runtime import multi_lora
    from ortlora.runtime import pool as pool_mod
    from ortlora.runtime.adapters import Adapters
    from ortlora.runtime.engine import Engine, Row

    modules = (multi_lora, pool_mod, engine_mod)
    per_class = multi_lora.module_classes
    for precision, folder in folders.items():
        adapters = onnx_adapters(folder, peft_root, names, Path(args.workdir))
        files = sorted({(adapters / f"{n}.onnx_adapter").resolve() for n in names}, key=lambda f: f.stat().st_size)
        kinds = [[f for f in files if f.stat().st_size == size] for size in sorted({f.stat().st_size for f in files})]
        # the mix's four kinds by size in turn (attention-only r8, r16, all-linear r8, r16), a file of each kind again
        # under another name where it has fewer than three
        mix = [kinds[i % len(kinds)][(i // len(kinds)) % len(kinds[i % len(kinds)])] for i in range(12)]

        def make(layout):
            for mod in modules:
                mod.module_classes = layout
            try:
                engine = Engine(folder, slots=16, max_len=256, prefix_cache_bytes=0)
                store = Adapters.for_engine(engine, capacity=64)
            finally:
                for mod in modules:
                    mod.module_classes = per_class
            held = [store.load(f, name=f"c{i}") for i, f in enumerate(mix)]
            if engine.hugepages_thread is not None:
                engine.hugepages_thread.join()
            rng = np.random.default_rng(0)
            for s in range(16):
                engine.prefill([Row(s, rng.integers(10, min(1000, engine.info.vocab_size), 32).tolist(), held[s % 12])])
            return engine, held

        engines = {"per class": make(per_class), "one class": make(lambda lora_inputs: [list(lora_inputs)])}
        cases = {"1 all-linear": lambda h: [h[len(kinds) - 1]] * 16,
                 "4 (one of each kind)": lambda h: [h[s % 4] for s in range(16)],
                 "7": lambda h: [h[s % 7] for s in range(16)],
                 "12": lambda h: [h[s % 12] for s in range(16)],
                 "6 attention-only": lambda h: [h[(s % 6) // 2 * 4 + s % 2] for s in range(16)],
                 "6 all-linear": lambda h: [h[(s % 6) // 2 * 4 + 2 + s % 2] for s in range(16)]}
        times = {(e, c): [] for e in engines for c in cases}
        for _ in range(5 * args.rounds + 2):
            for c, rows_of in cases.items():
                for e, (engine, held) in engines.items():
                    rows = [Row(s, [5], a) for s, a in enumerate(rows_of(held))]
                    engine.lengths[:16] = 40
                    engine.decode(rows)
                    engine.lengths[:16] = 40
                    t0 = time.perf_counter()
                    engine.decode(rows)
                    times[e, c].append(time.perf_counter() - t0)
        out = {}
        for c in cases:
            one, per = times["one class", c], times["per class", c]
            out[f"decode 16 rows, {c} adapters: one class / per class ms (min, median), per-step ratio median"] = [
                [round(min(one) * 1e3, 1), round(statistics.median(one) * 1e3, 1)],
                [round(min(per) * 1e3, 1), round(statistics.median(per) * 1e3, 1)],
                round(statistics.median(b / a for a, b in zip(one, per)), 3)]
        results[f"classes {precision}"] = out
        _print(f"classes {precision}", out)
        del engines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/ortlora-scale-adapters")
    p.add_argument("--source", default=None, help="where the random checkpoint is built (default: workdir)")
    p.add_argument("--precisions", nargs="+", default=["int8", "fp32"])
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--unique", type=int, default=None, help="distinct adapter files (default: all)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a tiny random llama instead (smoke runs)")
    p.add_argument("--parts", nargs="+", default=["engine", "classes"], choices=["engine", "classes"])
    args = p.parse_args()
    args.unique = args.unique or args.adapters
    _, folders, peft_root, names = prepare(args)
    results: dict = {"args": vars(args)}
    if "engine" in args.parts:
        engine_costs(args, folders, peft_root, names, results)
    if "classes" in args.parts:
        class_costs(args, folders, peft_root, names, results)
    (Path(args.workdir) / "costs.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
