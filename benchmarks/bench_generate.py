"""Time to first token and decode speed: ortlora vs onnxruntime-genai (same folder, same adapter file) vs PEFT on
PyTorch, on a random Qwen2.5-0.5B-shaped model; fp32 and int4, 32- and 512-token prompts, 128 new tokens, greedy,
without and with an active rank-16 all-linear adapter. Not a test: one pass, printed side by side.

    python benchmarks/bench_generate.py [--workdir /tmp/ortlora-bench-generate] [--precisions fp32 int4]

The model, adapter and exports are built on the first run and reused. onnxruntime-genai runs with the thread count
that export writes into genai_config.json (this machine's cores), i.e. at its best.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _models import qwen25_05b  # noqa: E402

NEW_TOKENS = 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare(work: Path, precisions: list[str]) -> tuple[Path, Path, dict[str, Path], dict[str, Path]]:
    from ortlora.adapters.convert import convert_adapter
    from ortlora.export import export
    from ortlora.testing import build_adapter

    model = qwen25_05b(work / "qwen2.5-0.5b-random")
    peft = work / "adapter-r16"
    if not (peft / "adapter_config.json").is_file():
        build_adapter(model, peft, r=16, alpha=32, target_modules=TARGETS, std=0.02)
    folders, adapters = {}, {}
    for precision in precisions:
        out = work / f"onnx-{precision}"
        if not (out / "genai_config.json").is_file():
            export(model, out, adapter_path=[peft], precision=precision, progress=False)
        folders[precision] = out
        adapters[precision] = work / f"r16-{precision}.onnx_adapter"
        if not adapters[precision].is_file():
            convert_adapter(peft, adapters[precision], model=out)
    return model, peft, folders, adapters


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(10, vocab - 10, n).tolist()


def timed(first_and_rest) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s over the remaining NEW_TOKENS - 1) of one generation."""
    t0 = time.perf_counter()
    it = iter(first_and_rest)
    n = next(it)
    t1 = time.perf_counter()
    for n in it:
        pass
    t2 = time.perf_counter()
    assert n == NEW_TOKENS, f"generated {n} tokens, expected {NEW_TOKENS}"
    return t1 - t0, (NEW_TOKENS - 1) / (t2 - t1)


def bench_ortlora(folder: Path, adapter_file: Path, prompts: dict[int, list[int]]) -> dict:
    from ortlora import Model

    m = Model(folder, slots=1, max_len=max(map(len, prompts.values())) + NEW_TOKENS + 8)
    m.adapters.load(adapter_file, name="r16")
    results = {}

    def run(ids, adapter):
        count = 0
        for chunk in m.stream(ids, adapter=adapter, max_new_tokens=NEW_TOKENS, ignore_eos=True):
            count += len(chunk.token_ids)
            yield count

    for adapter in (None, "r16"):
        list(run(prompts[min(prompts)], adapter))  # warm-up
        for n, ids in prompts.items():
            results[(n, adapter is not None)] = timed(run(ids, adapter))
    del m
    gc.collect()
    return results


def bench_genai(folder: Path, adapter_file: Path, prompts: dict[int, list[int]]) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    adapters.load(str(adapter_file), "r16")
    results = {}

    def run(ids, adapter):
        params = og.GeneratorParams(model)
        total = len(ids) + NEW_TOKENS
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        if adapter:
            gen.set_active_adapter(adapters, adapter)
        gen.append_tokens([ids])  # prefill; the first token is picked in generate_next_token
        count = 0
        while not gen.is_done():
            gen.generate_next_token()
            count += 1
            yield count
        del gen

    for adapter in (None, "r16"):
        list(run(prompts[min(prompts)], adapter))
        for n, ids in prompts.items():
            results[(n, adapter is not None)] = timed(run(ids, adapter))
    del adapters, model
    gc.collect()
    return results


def bench_torch(model_dir: Path, peft_dir: Path, prompts: dict[int, list[int]], threads: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    results = {}

    def run(model, ids):
        with torch.inference_mode():
            out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            yield 1
            for count in range(2, NEW_TOKENS + 1):
                out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
                yield count

    for with_adapter in (False, True):
        model = PeftModel.from_pretrained(base, peft_dir).eval() if with_adapter else base.eval()
        list(run(model, prompts[min(prompts)]))
        for n, ids in prompts.items():
            results[(n, with_adapter)] = timed(run(model, ids))
    del base, model
    gc.collect()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/ortlora-bench-generate")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    ap.add_argument("--prompt-lengths", nargs="+", type=int, default=[32, 512])
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, peft_dir, folders, adapters = prepare(work, a.precisions)
    threads = len(os.sched_getaffinity(0))
    from ortlora.runtime.engine import ModelInfo

    rows = []
    torch_results = None
    for precision in a.precisions:
        vocab = ModelInfo.read(folders[precision]).vocab_size
        prompts = {n: prompt_ids(n, vocab) for n in a.prompt_lengths}
        ours = bench_ortlora(folders[precision], adapters[precision], prompts)
        theirs = bench_genai(folders[precision], adapters[precision], prompts)
        if precision == "fp32" and not a.no_torch:
            torch_results = bench_torch(model_dir, peft_dir, prompts, threads)
        for key in ours:
            pt = torch_results.get(key) if (torch_results and precision == "fp32") else None
            rows.append((precision, *key, ours[key], theirs[key], pt))

    print(f"\nrandom Qwen2.5-0.5B-shaped model, greedy, {NEW_TOKENS} new tokens, {threads} threads; "
          "TTFT = time to first token (s), tok/s = decode tokens/s after the first")
    head = (f"{'prec':5s} {'prompt':>6s} {'adapter':>7s} | {'ortlora TTFT':>12s} {'tok/s':>6s} | {'genai TTFT':>10s} "
            f"{'tok/s':>6s} | {'PEFT TTFT':>9s} {'tok/s':>6s} | {'decode vs genai':>15s} {'vs PEFT':>7s} "
            f"{'TTFT vs genai':>13s}")
    print(head)
    print("-" * len(head))
    for precision, n, with_adapter, (o_ttft, o_tps), (g_ttft, g_tps), pt in rows:
        p_ttft, p_tps = pt if pt else (float("nan"), float("nan"))
        print(f"{precision:5s} {n:6d} {'r16' if with_adapter else '-':>7s} | {o_ttft:12.3f} {o_tps:6.1f} | "
              f"{g_ttft:10.3f} {g_tps:6.1f} | {p_ttft:9.3f} {p_tps:6.1f} | {o_tps / g_tps:14.2f}x "
              f"{o_tps / p_tps:6.2f}x {o_ttft / g_ttft:12.2f}x")
    by_key = {(p, n, w): (o, g) for p, n, w, o, g, _ in rows}
    for precision in a.precisions:
        for n in a.prompt_lengths:
            base, lora = by_key[(precision, n, False)][0], by_key[(precision, n, True)][0]
            print(f"ortlora adapter overhead {precision} prompt {n}: decode {100 * (base[1] / lora[1] - 1):+.1f}%, "
                  f"TTFT {100 * (lora[0] / base[0] - 1):+.1f}%")


if __name__ == "__main__":
    main()
