"""Memory and decode speed of the engine with many adapters: RSS after load and after single, same-adapter and
mixed-adapter batches, next to the size of model.onnx.data and the KV actually in use. Not a test: printed.

    python benchmarks/bench_memory.py FOLDER ADAPTER_DIR [--steps 24] [--threads N]

FOLDER: an exported folder with LoRA inputs; ADAPTER_DIR: its .onnx_adapter files (8 are used). Each run is a fresh
batch: 32-token prompts prefilled, 2 decode steps to warm up, then `--steps` timed decode steps. To compare two
versions of the code, run it twice with PYTHONPATH pointing at each (the script imports whichever `ortlora` wins).
Prints one JSON line: rss_mb after load / after each run / peak, tok/s per run (wall clock), cpu_ms per step
(process CPU time: with `--threads 1` it is the step's work, whatever else the machine runs), weights_mb, kv_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = 32
RUNS = [("base", 1, 0), ("single", 1, 1), ("same8", 8, 1), ("mixed8", 8, 8), ("mixed16", 16, 8)]  # rows, adapters


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e3
    return 0.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("adapters", type=Path)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import ortlora
    from ortlora.runtime.engine import Row

    out = {"code": str(Path(ortlora.__file__).parent.parent), "weights_mb": round(sum(
        p.stat().st_size for p in args.folder.glob("*.onnx.data")) / 1e6)}
    t0 = time.perf_counter()
    model = ortlora.Model(args.folder, slots=16, max_len=PROMPT + args.steps + 8, threads=args.threads)
    files = sorted(args.adapters.glob("*.onnx_adapter"))[:8]
    for f in files:
        model.adapters.load(f, name=f.stem)
    out["load_s"] = round(time.perf_counter() - t0, 1)
    out["rss_after_load_mb"] = round(rss_mb())
    engine, names = model.engine, [f.stem for f in files]
    kv_token = sum(a.nbytes for a in engine.kv.values()) / (engine.slots * engine.max_len)
    rng = np.random.default_rng(0)
    for name, rows, n_adapters in RUNS:
        held = [model.adapters.acquire(names[i % n_adapters]) if n_adapters else None for i in range(rows)]
        slots = [engine.acquire_slot() for _ in range(rows)]
        try:
            prompts = rng.integers(0, engine.info.vocab_size, (rows, PROMPT)).tolist()
            for s, p, a in zip(slots, prompts, held):
                engine.prefill([Row(s, p, a)])
            step = [Row(s, [1], a) for s, a in zip(slots, held)]
            for _ in range(2):
                engine.decode(step)
            t, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                engine.decode(step)
            dt, cpu = time.perf_counter() - t, time.process_time() - cpu
        finally:
            for s in slots:
                engine.release_slot(s)
            for a in held:
                model.adapters.release(a)
        out[f"{name}_tok_s"] = round(rows * args.steps / dt, 1)
        out[f"{name}_step_ms"] = round(1e3 * dt / args.steps, 1)
        out[f"{name}_cpu_ms"] = round(1e3 * cpu / args.steps, 2)
        out[f"rss_after_{name}_mb"] = round(rss_mb())
        out[f"kv_{name}_mb"] = round(kv_token * rows * (PROMPT + args.steps + 2) / 1e6, 1)
    out["peak_rss_mb"] = round(peak_mb())
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
