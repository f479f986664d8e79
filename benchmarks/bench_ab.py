"""A/B of two source trees of ortlora on the engine's decode step (no HTTP): the same model folder and adapter
files, rounds alternating between the trees, each round in a fresh process; best round per tree and configuration.
Not a test: one pass, printed. For "did this change move decode speed?".

    python benchmarks/bench_ab.py --baseline /path/to/other/checkout [--folder F --adapters D] [--rounds 3]

Configurations, N rows decoding (16 by default, 48-token prompts): base (no adapter), one adapter on every row
("same"), 8 different adapters ("mixed"), on bench_serve.py's fp32 Qwen2.5-0.5B-shaped folder and adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MEASURE = r"""
import json, sys, time
folder, adapters, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
from ortlora.runtime.engine import Engine, Row
engine = Engine(folder, slots=n, max_len=128)
try:
    from ortlora.runtime.adapters import Adapters
    store = Adapters.for_engine(engine)
except ImportError:  # a tree from before the adapters' owner
    from ortlora.runtime.adapter_store import AdapterStore
    store = AdapterStore(engine.lora_inputs)
held = [store.load(f"{adapters}/a{i}.onnx_adapter", f"a{i}") for i in range(8)]
out = {}
for mode in ("base", "same", "mixed"):
    pick = {"base": lambda i: None, "same": lambda i: held[0], "mixed": lambda i: held[i % 8]}[mode]
    slots = [engine.acquire_slot() for _ in range(n)]
    for i, s in enumerate(slots):
        engine.prefill([Row(s, [(7 * i + k) % 300 + 10 for k in range(48)], pick(i))])
    rows = [Row(s, [11], pick(i)) for i, s in enumerate(slots)]
    for _ in range(3):
        engine.decode(rows)  # warm-up: the mixed graph, bindings, the pool
    t0 = time.perf_counter()
    for _ in range(24):
        engine.decode(rows)
    out[mode] = n * 24 / (time.perf_counter() - t0)
    for s in slots:
        engine.release_slot(s)
print(json.dumps(out))
"""


def run(tree: Path, folder: Path, adapters: Path, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(adapters), str(n)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="another checkout of ortlora (its repository root)")
    ap.add_argument("--current", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--workdir", default="/tmp/ortlora-bench-serve", help="adapters (bench_serve.py's, shared)")
    ap.add_argument("--source", default="/tmp/ortlora-bench-generate", help="checkpoint + exports (shared)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_serve import prepare

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    _, _, folders, adapter_dirs = prepare(Path(args.source), Path(args.workdir), ["fp32"])
    folder, adapters = folders["fp32"], adapter_dirs["fp32"]
    trees = {"baseline": Path(args.baseline).resolve(), "current": Path(args.current).resolve()}
    best: dict[str, dict[str, float]] = {name: {} for name in trees}
    for r in range(args.rounds):
        for name, tree in (trees.items() if r % 2 == 0 else reversed(trees.items())):
            got = run(tree, folder, adapters, args.rows)
            for mode, tps in got.items():
                best[name][mode] = max(best[name].get(mode, 0.0), tps)
            print(f"round {r + 1} {name:8s} " + "  ".join(f"{m} {t:.1f}" for m, t in got.items()), flush=True)
    print(f"\nbest of {args.rounds}, {args.rows} rows, decode tok/s (current / baseline):")
    for mode in best["current"]:
        c, b = best["current"][mode], best["baseline"][mode]
        print(f"  {mode:6s} {c:7.1f} / {b:7.1f} = {c / b:.3f}x")


if __name__ == "__main__":
    main()
