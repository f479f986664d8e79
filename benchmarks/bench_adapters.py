"""Decode speed of mixed batches by adapter kind: DoRA rows vs LoRA rows vs the base model, on a random
Qwen2.5-0.5B-shaped model (fp32), rank-16 adapters on every linear layer, 32-token prompts, greedy, ignore EOS.
Not a test: one pass, printed.

    python benchmarks/bench_adapters.py [--workdir /tmp/ortlora-bench-adapters] [--batch 8]

Rows of one batch, each a different adapter (the mixed-adapter graph), through `ortlora.Model`:
  base           no adapter on any row
  lora           a different LoRA adapter per row
  dora           a different DoRA adapter per row (factor gathered per row)
  lora+dora      half and half
  lora-scaled    one LoRA adapter at a different scale per row (derived adapters)
  lora (plain)   LoRA rows on the export without DoRA inputs: what the DoRA inputs cost LoRA-only traffic
Decode tok/s = rows x (new - 1) / (time of a run with `new` tokens - time of a run with 1 token).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import PROMPT, TARGETS, prepare, prompts  # noqa: E402

NEW = 64


def dora_adapters(model: Path, work: Path, n: int) -> list[Path]:
    """n PEFT DoRA adapters of rank 16: random A/B, magnitudes near 1 (any finite factor decodes at the same speed)."""
    from safetensors.numpy import load_file, save_file

    from ortlora.testing import build_adapter

    out = []
    for i in range(n):
        d = work / f"dora-{i}"
        if not (d / "adapter_config.json").is_file():
            if i == 0:
                build_adapter(model, d, r=16, alpha=32, target_modules=TARGETS, std=0.02, use_dora=True)
            else:
                shutil.copytree(out[0], d)
            f = d / "adapter_model.safetensors"
            rng = np.random.default_rng(100 + i)
            save_file({k: ((np.abs(v) + 1) if "magnitude" in k else rng.standard_normal(v.shape) * 0.02)
                       .astype(v.dtype) for k, v in load_file(f).items()}, str(f))
        out.append(d)
    return out


REPEATS = 2  # --repeats: the best of a few runs (a shared machine is noisy)


def decode_tps(m, adapters: list, scales: list[float] | None = None, seed: int = 0) -> float:
    rows = prompts(len(adapters), m.engine.info.vocab_size, seed)
    kw = dict(ignore_eos=True, adapter_scale=scales or 1.0)
    m.complete(rows, adapters, max_new_tokens=4, **kw)  # warm: sessions, bindings, pool slots
    best = 0.0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        m.complete(rows, adapters, max_new_tokens=1, **kw)
        t1 = time.perf_counter()
        m.complete(rows, adapters, max_new_tokens=NEW, **kw)
        t2 = time.perf_counter()
        best = max(best, len(rows) * (NEW - 1) / ((t2 - t1) - (t1 - t0)))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/ortlora-bench-adapters")
    ap.add_argument("--source", default="/tmp/ortlora-bench-generate", help="checkpoint + plain export (shared)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=REPEATS)
    args = ap.parse_args()
    globals()["REPEATS"] = args.repeats
    from ortlora import Model
    from ortlora.adapters.convert import convert_adapter
    from ortlora.export import export

    work, source, b = Path(args.workdir), Path(args.source), args.batch
    work.mkdir(parents=True, exist_ok=True)
    model, peft, folders, adapter_dirs = prepare(source, work, ["fp32"])
    dora = dora_adapters(model, work, b)
    folder = work / "onnx-fp32-dora"
    if not (folder / "genai_config.json").is_file():
        export(model, folder, adapter_path=[peft[0], dora[0]], progress=False)
    files = work / "adapters-dora-export"
    files.mkdir(exist_ok=True)
    m = Model(folder, slots=b, max_len=PROMPT + NEW + 8, adapter_capacity=2 * b + 2)
    for i, d in enumerate(peft[:b]):
        f = files / f"l{i}.onnx_adapter"
        m.adapters.load(f if f.is_file() else convert_adapter(d, f, model=folder), name=f"l{i}")
    for i, d in enumerate(dora):
        f = files / f"d{i}.onnx_adapter"
        m.adapters.load(f if f.is_file() else convert_adapter(d, f, model=folder), name=f"d{i}")
    lora = [f"l{i % len(peft)}" for i in range(b)]
    doras = [f"d{i}" for i in range(b)]
    results = {
        "base": decode_tps(m, [None] * b),
        "lora": decode_tps(m, lora),
        "dora": decode_tps(m, doras),
        "lora+dora": decode_tps(m, [lora[i] if i % 2 else doras[i] for i in range(b)]),
        "lora-scaled": decode_tps(m, ["l0"] * b, [0.25 + 0.25 * i for i in range(b)]),
    }
    del m
    gc.collect()  # the first model's sessions go before the second's are made (memory)
    plain = Model(folders["fp32"], slots=b, max_len=PROMPT + NEW + 8, adapter_capacity=b + 1)
    for i in range(len(peft)):
        plain.adapters.load(adapter_dirs["fp32"] / f"a{i}.onnx_adapter", name=f"l{i}")
    results["lora (plain export)"] = decode_tps(plain, lora)
    print(f"decode tok/s, batch {b}, {PROMPT}-token prompts, {NEW} new tokens, fp32 Qwen2.5-0.5B-shaped, rank 16")
    for name, tps in results.items():
        print(f"  {name:<22} {tps:8.1f}")


if __name__ == "__main__":
    main()
