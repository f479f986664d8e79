"""Decode step of the engine's one session (the mixed-adapter graph; one adapter = a pool of one slot) against a
plain session of the exported graph (what single-adapter and base runs used before), in one process, steps
interleaved (each session first every other step) so that the machine's other load falls on both alike. Not a test:
printed.

    python benchmarks/bench_one_session.py FOLDER ADAPTER_FILE [--steps 40] [--rows 1 8] [--threads N]

The plain session is driven as the engine drove it: KV cache slices bound as past and present, persistent decode
inputs, the adapter's own tensors bound (the others at their rank-0 defaults), one-position logits.
Prints one JSON line per (rows, adapter or base): median and best step time of each and their ratio; with
`--threads 1` also the median CPU time of the calling thread (onnxruntime then runs every kernel on it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

PROMPT = 32


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from ortlora.runtime.adapters import Adapters
    from ortlora.runtime.engine import KEEP, DecodeInputs, Engine, Row, session_options

    rows_max = max(args.rows)
    engine = Engine(args.folder, slots=rows_max, max_len=PROMPT + args.steps + 8, threads=args.threads)
    adapters = Adapters.for_engine(engine)
    adapter = adapters.load(args.adapter, name="a")
    plain = ort.InferenceSession(str(engine.model_path), session_options(engine.threads),
                                 providers=["CPUExecutionProvider"])
    kv = {name: np.zeros_like(arr) for name, arr in engine.kv.items()}
    rng = np.random.default_rng(0)
    for rows in args.rows:
        for which in (None, adapter):
            for s in range(engine.slots):  # both caches hold the same prompts
                engine.release_slot(s)
            slots = [engine.acquire_slot() for _ in range(rows)]
            for s in slots:
                engine.prefill([Row(s, rng.integers(0, engine.info.vocab_size, PROMPT).tolist(), which)])
            for name in kv:
                kv[name][:rows] = engine.kv[name][:rows]
            lengths = engine.lengths[:rows].copy()
            io = plain.io_binding()
            for past, present in engine.info.kv_names():
                value = ort.OrtValue.ortvalue_from_numpy(kv[past][:rows])
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
            inputs = DecodeInputs.make(rows, engine.max_len)
            io.bind_ortvalue_input("input_ids", inputs.values[0])
            io.bind_ortvalue_input("attention_mask", inputs.values[1])
            if engine.has_keep:
                io.bind_ortvalue_input(KEEP, ort.OrtValue.ortvalue_from_numpy(np.array(1, np.int64)))
            held = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
                    for a in (which.params.values() if which else ())]
            for name, value in zip(which.params if which else (), held):
                io.bind_ortvalue_input(name, value)
            logits = np.empty((rows, 1, engine.info.vocab_size), engine.dtype)
            io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            step = [Row(s, [1], which) for s in slots]
            times: dict[str, list[float]] = {"one_session": [], "plain": []}
            cpu: dict[str, list[float]] = {"one_session": [], "plain": []}
            def run_plain():
                lengths[:] += 1
                inputs.fill(np.ones(rows, np.int64), lengths)
                plain.run_with_iobinding(io)

            order = [("plain", run_plain), ("one_session", lambda: engine.decode(step))]
            for i in range(args.steps + 2):
                for name, run in order if i % 2 else order[::-1]:  # each first half the time: order effects cancel
                    t, c = time.perf_counter(), time.thread_time()
                    run()
                    if i >= 2:  # warm-up
                        times[name].append(time.perf_counter() - t)
                        cpu[name].append(time.thread_time() - c)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            best = {k: min(v) * 1e3 for k, v in times.items()}
            out = {"rows": rows, "adapter": which is not None,
                   "median_ms": {k: round(v, 2) for k, v in med.items()},
                   "best_ms": {k: round(v, 2) for k, v in best.items()},
                   "median_ratio": round(med["one_session"] / med["plain"], 3),
                   "best_ratio": round(best["one_session"] / best["plain"], 3)}
            if engine.threads == 1:  # the work on this thread, whatever else the machine runs
                mc = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
                out.update(median_cpu_ms={k: round(v, 2) for k, v in mc.items()},
                           median_cpu_ratio=round(mc["one_session"] / mc["plain"], 3))
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
