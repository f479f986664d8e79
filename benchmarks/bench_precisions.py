"""Which precision serves fastest: fp32, int4, int8 (and int8 with one activation scale per call) on one
Qwen2.5-0.5B-shaped model, through ortlora's engine: a decode step of 1 and 16 rows, a 256-token prompt.

    python benchmarks/bench_precisions.py                  # ~10 min on 2 cores (exports once into --out)
    python benchmarks/bench_precisions.py --rounds 3 --only int8,int4

The model is exported with LoRA inputs on every linear (as a server with adapters runs it; no adapter is fed, so
the LoRA branches have rank 0). All engines are loaded in one process and measured in turns, a different order
each round; the table gives the median ms and the spread (min-max over rounds). "int8 per-tensor" is the int8
folder with DynamicQuantizeMatMul in place of the per-row quantization (benchmarks/quantize_accuracy.py's
`per_tensor_variant`): what batch-invariance costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _models import qwen25_05b  # noqa: E402

PRECISIONS = ("fp32", "int4", "int8", "int8 per-tensor")
PROMPT = 256


def folders(root: Path, wanted: list[str]) -> dict[str, Path]:
    from ortlora.export import export
    from quantize_accuracy import per_tensor_variant

    hf = qwen25_05b(root / "hf")
    out = {}
    for p in wanted:
        folder = root / p.replace(" ", "-")
        if not (folder / "model.onnx").is_file():
            if p == "int8 per-tensor":
                per_tensor_variant(folders(root, ["int8"])["int8"], folder)
            else:
                t = time.perf_counter()
                export(hf, folder, precision=p, lora_targets=["all-linear"], context_length=1024, progress=False)
                print(f"exported {p} in {time.perf_counter() - t:.0f}s", flush=True)
        out[p] = folder
    return out


class Bench:
    """One engine with 16 slots: each slot holds a 32-token prompt; a decode step appends a token to the rows
    measured, and the slots are cut back to 32 tokens between measurements."""

    def __init__(self, folder: Path, threads: int):
        from ortlora.runtime.engine import Engine, Row

        self.Row = Row
        self.engine = Engine(folder, slots=16, max_len=1024, threads=threads, prefix_cache_bytes=0)
        self.slots = [self.engine.acquire_slot() for _ in range(16)]
        for s in self.slots:
            self.engine.prefill([Row(s, list(range(10 + s, 42 + s)))])

    def decode(self, rows: int, steps: int = 8) -> float:
        """ms per decode step of `rows` rows."""
        t = time.perf_counter()
        for i in range(steps):
            self.engine.decode([self.Row(s, [100 + i]) for s in self.slots[:rows]])
        ms = 1000 * (time.perf_counter() - t) / steps
        for s in self.slots[:rows]:
            self.engine.truncate(s, 32)
        return ms

    def prompt(self) -> float:
        """ms to prefill a 256-token prompt (after the 32 cached tokens of slot 0)."""
        t = time.perf_counter()
        self.engine.prefill([self.Row(self.slots[0], list(range(50, 50 + PROMPT)))])
        ms = 1000 * (time.perf_counter() - t)
        self.engine.truncate(self.slots[0], 32)
        return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/ortlora-bench-precisions")
    p.add_argument("--only", default=None, help=f"comma-separated, from: {', '.join(PRECISIONS)}")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    wanted = [x.strip() for x in a.only.split(",")] if a.only else list(PRECISIONS)
    bad = [x for x in wanted if x not in PRECISIONS]
    if bad:
        p.error(f"--only: unknown {', '.join(bad)}")
    load = os.getloadavg()[0]
    print(f"Qwen2.5-0.5B shape, {a.threads} threads, {a.rounds} rounds, load average {load:.1f} on "
          f"{len(os.sched_getaffinity(0))} cores" + (" (loaded: other processes share the cores)" if load > 1 else ""))
    benches = {}
    for name, folder in folders(Path(a.out), wanted).items():
        t = time.perf_counter()
        benches[name] = Bench(folder, a.threads)
        print(f"loaded {name} in {time.perf_counter() - t:.1f}s", flush=True)
    cases = {"decode 1 row": lambda b: b.decode(1), "decode 16 rows": lambda b: b.decode(16),
             f"prompt {PROMPT} tokens": lambda b: b.prompt()}
    times = {(n, c): [] for n in benches for c in cases}
    names = list(benches)
    for r in range(a.rounds):
        for case, run in cases.items():
            for n in names[r % len(names):] + names[:r % len(names)]:
                times[n, case].append(run(benches[n]))
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    print("\n| precision | " + " | ".join(f"{c} ms" for c in cases) + " | 16-row decode tok/s |")
    print("|---|" + "---|" * (len(cases) + 1))
    for n in names:
        cells = [times[n, c] for c in cases]
        text = " | ".join(f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in cells)
        print(f"| {n} | {text} | {16000 / statistics.median(cells[1]):.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({f"{n} | {c}": v for (n, c), v in times.items()}, indent=1))


if __name__ == "__main__":
    main()
