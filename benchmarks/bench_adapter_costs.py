"""What one cold adapter and one distinct adapter in a step cost the engine (issue 28), no server: the adapters and
exports of bench_adapters_scale.py (built there if missing).

    python benchmarks/bench_adapter_costs.py [--precisions int8 fp32] [--rounds 2] [--unique 100]
        [--parts engine classes slot0]
        [--workdir /tmp/ortlora-scale-adapters]

load: one adapter file's CPU as the server reads it (one private read into one allocation) against mapping the file
    and copying each tensor, the finite check included; the median over 24 files of the mix.
step: a 16-row decode step against the distinct adapters it binds (1, 4, 8, 13, 16 of the largest files: all-linear
    rank 16, every pool slot full); min and median over interleaved rounds.
classes: the pool's slots per module class (this tree) against every module in one class (the layout before it: an
    attention-only adapter's slot also ran the MLP's LoRA over zeros), two engines in one process, steps alternating:
    16-row decode steps over k distinct adapters of the mix's four kinds (attention-only / all-linear x rank 8 / 16);
    min and median ms, and the median of the per-step ratios.
slot0: rows at a class's slot 0 (no adapter, or an adapter without the class) as one computed row whose product is
    zeroed (this tree) against every such row computed (the layout before it: the graph without its Where nodes, and
    every group padded to slot 0's rows), two engines in one process, the same steps and one more (8 rows without an
    adapter, 4 adapters over the other 8).
"""

from __future__ import annotations

import argparse
import contextlib
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

    modules = (multi_lora, pool_mod, engine_mod)
    per_class = multi_lora.module_classes

    @contextlib.contextmanager
    def one_class(engine_holder):
        for mod in modules:
            mod.module_classes = lambda lora_inputs: [list(lora_inputs)]
        try:
            yield
        finally:
            for mod in modules:
                mod.module_classes = per_class

    _compare(args, folders, peft_root, names, results, "classes", "per class", "one class", one_class)


def slot0_costs(args, folders, peft_root, names, results) -> None:
    """Rows at a class's slot 0 as one computed row, zeroed (this tree) against every such row computed (the layout
    before it: the mixed graph without its Where nodes, the grouping without the condensed slot 0)."""
    from ortlora.runtime import multi_lora
    from ortlora.runtime import pool as pool_mod

    real = multi_lora.mixed_adapter_model

    def without_where(model_path, lora_inputs):
        proto = real(model_path, lora_inputs)
        g = proto.graph
        wheres = {n.output[0]: n.input[1] for n in g.node if n.op_type == "Where" and n.input[0].startswith(multi_lora.LIVE)}
        kept = [n for n in g.node if n.output[0] not in wheres]
        for n in kept:
            n.input[:] = [wheres.get(x, x) for x in n.input]
        del g.node[:]
        g.node.extend(kept)
        inputs = [i for i in g.input if not i.name.startswith(multi_lora.LIVE)]
        del g.input[:]
        g.input.extend(inputs)
        return proto

    def every_row(row_slots, names_, dora=False):
        first, last = min(row_slots), max(row_slots)
        members = [[] for _ in range(last - first + 1)]
        for row, slot in enumerate(row_slots):
            members[slot - first].append(row)
        width = max(len(m) for m in members)
        gather, scatter = np.zeros(len(members) * width, np.int64), np.empty(len(row_slots), np.int64)
        for g, rows in enumerate(members):
            gather[g * width:g * width + len(rows)] = rows
            scatter[rows] = np.arange(g * width, g * width + len(rows))
        feeds = {names_.gather: gather, names_.scatter: scatter,
                 names_.group_shape: np.array([len(members), -1, 0], np.int64),
                 names_.ungroup_shape: np.array([len(members) * width, -1, 0], np.int64)}
        if dora:
            feeds[names_.row_slot] = np.asarray(row_slots, np.int64) - first
        return pool_mod.Groups(first, len(members), feeds)

    @contextlib.contextmanager
    def every_row_computed(engine_holder):
        multi_lora.mixed_adapter_model = without_where
        try:
            yield
        finally:
            multi_lora.mixed_adapter_model = real
        engine = engine_holder[0]
        for run in engine._adapter_pool().runs:
            run.groups = lambda rows, run=run: every_row(rows, run.names, run.dora)
        one_slot = engine._one_slot_run
        engine._one_slot_run = lambda k, rows: {n: v for n, v in one_slot(k, rows).items()
                                                if not n.startswith(multi_lora.LIVE)}

    _compare(args, folders, peft_root, names, results, "slot0", "slot 0 one row", "every row", every_row_computed,
             extra={"4 (8 rows without any)": lambda h: [None] * 8 + [h[2 + s // 2] for s in range(8)]})


def _compare(args, folders, peft_root, names, results, part, mine, theirs, layout, extra=None) -> None:
    """Two engines in one process, this tree's (`mine`) and one made inside `layout(holder)` (`theirs`; the context
    manager's code after its yield runs with holder = [the engine, its adapters]), 16-row decode steps alternating over k
    distinct adapters of the mix's four kinds; min and median ms, and the median of the per-step ratios."""
    from ortlora.runtime.adapters import Adapters
    from ortlora.runtime.engine import Engine, Row

    for precision, folder in folders.items():
        adapters = onnx_adapters(folder, peft_root, names, Path(args.workdir))
        files = sorted({(adapters / f"{n}.onnx_adapter").resolve() for n in names}, key=lambda f: f.stat().st_size)
        kinds = [[f for f in files if f.stat().st_size == size] for size in sorted({f.stat().st_size for f in files})]
        # the mix's four kinds by size in turn (attention-only r8, r16, all-linear r8, r16), a file of each kind again
        # under another name where it has fewer than three
        mix = [kinds[i % len(kinds)][(i // len(kinds)) % len(kinds[i % len(kinds)])] for i in range(12)]

        def make(context):
            holder: list = []
            with context(holder):
                holder.append(Engine(folder, slots=16, max_len=256, prefix_cache_bytes=0))
                holder.append(Adapters.for_engine(holder[0], capacity=64))  # its pool of the same layout
            engine, store = holder
            held = [store.load(f, name=f"c{i}") for i, f in enumerate(mix)]
            if engine.hugepages_thread is not None:
                engine.hugepages_thread.join()
            rng = np.random.default_rng(0)
            for s in range(16):
                engine.prefill([Row(s, rng.integers(10, min(1000, engine.info.vocab_size), 32).tolist(), held[s % 12])])
            return engine, held

        engines = {mine: make(lambda holder: contextlib.nullcontext()), theirs: make(layout)}
        cases = {"1 all-linear": lambda h: [h[len(kinds) - 1]] * 16,
                 "4 (one of each kind)": lambda h: [h[s % 4] for s in range(16)],
                 "7": lambda h: [h[s % 7] for s in range(16)],
                 "12": lambda h: [h[s % 12] for s in range(16)],
                 "6 attention-only": lambda h: [h[(s % 6) // 2 * 4 + s % 2] for s in range(16)],
                 "6 all-linear": lambda h: [h[(s % 6) // 2 * 4 + 2 + s % 2] for s in range(16)], **(extra or {})}
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
            a, b = times[theirs, c], times[mine, c]
            out[f"decode 16 rows, {c} adapters: {theirs} / {mine} ms (min, median), per-step ratio median"] = [
                [round(min(a) * 1e3, 1), round(statistics.median(a) * 1e3, 1)],
                [round(min(b) * 1e3, 1), round(statistics.median(b) * 1e3, 1)],
                round(statistics.median(y / x for x, y in zip(a, b)), 3)]
        results[f"{part} {precision}"] = out
        _print(f"{part} {precision}", out)
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
    p.add_argument("--parts", nargs="+", default=["engine", "classes", "slot0"], choices=["engine", "classes", "slot0"])
    args = p.parse_args()
    args.unique = args.unique or args.adapters
    _, folders, peft_root, names = prepare(args)
    results: dict = {"args": vars(args)}
    if "engine" in args.parts:
        engine_costs(args, folders, peft_root, names, results)
    if "classes" in args.parts:
        class_costs(args, folders, peft_root, names, results)
    if "slot0" in args.parts:
        slot0_costs(args, folders, peft_root, names, results)
    (Path(args.workdir) / "costs.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
