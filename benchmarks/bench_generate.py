"""Time to first token and decode speed: ortlora vs onnxruntime-genai (same folder, same adapter file) vs PEFT on
PyTorch, on a random Qwen2.5-0.5B-shaped model; fp32 and int4, 32- and 512-token prompts, 128 new tokens, greedy,
without and with an active rank-16 all-linear adapter. Not a test: one pass, printed side by side.

    python benchmarks/bench_generate.py [--workdir /tmp/ortlora-bench-generate] [--precisions fp32 int4]

The model, adapter and exports are built on the first run and reused. onnxruntime-genai runs with the thread count
that export writes into genai_config.json (this machine's cores), i.e. at its best. Each engine lives in its own
process (no shared allocator, thread pools or page layout), and the engines take turns on every configuration.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
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


class Ortlora:
    def __init__(self, folder: Path, adapter_file: Path, max_len: int):
        from ortlora import Model

        self.model = Model(folder, slots=4, max_len=max_len)
        self.model.adapters.load(adapter_file, name="r16")

    def run(self, ids, adapter: bool):
        count = 0
        for chunk in self.model.stream(ids, adapter="r16" if adapter else None, max_new_tokens=NEW_TOKENS,
                                       ignore_eos=True):
            count += len(chunk.token_ids)
            yield count


class Genai:
    def __init__(self, folder: Path, adapter_file: Path, max_len: int):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        self.adapters = og.Adapters(self.model)
        self.adapters.load(str(adapter_file), "r16")

    def run(self, ids, adapter: bool):
        params = self.og.GeneratorParams(self.model)
        total = len(ids) + NEW_TOKENS
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = self.og.Generator(self.model, params)
        if adapter:
            gen.set_active_adapter(self.adapters, "r16")
        gen.append_tokens([ids])  # prefill; the first token is picked in generate_next_token
        count = 0
        while not gen.is_done():
            gen.generate_next_token()
            count += 1
            yield count


class Peft:
    """transformers + PEFT (LoRA layers unmerged), fp32; the base runs with the adapter disabled."""

    def __init__(self, model_dir: Path, peft_dir: Path, threads: int):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(base, peft_dir).eval()

    def run(self, ids, adapter: bool):
        import contextlib

        torch = self.torch
        ctx = contextlib.nullcontext() if adapter else self.model.disable_adapter()
        with torch.inference_mode(), ctx:
            out = self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            yield 1
            for count in range(2, NEW_TOKENS + 1):
                out = self.model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
                yield count


def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return min(r[0] for r in runs), max(r[1] for r in runs)


ENGINES = {"ortlora": Ortlora, "genai": Genai, "PEFT": Peft}


def serve_engine(conn, name: str, args: tuple) -> None:
    """A worker process: build one engine, then time generations (or the batch costs) on request."""
    engine = ENGINES[name](*args)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        kind, payload = msg
        if kind == "warm":
            for adapter in (False, True):
                for _ in itertools.islice(engine.run(payload, adapter), 4):
                    pass
            conn.send(None)
        elif kind == "run":
            conn.send(timed(engine.run(*payload)))
        else:
            conn.send(batch_costs(engine, *payload))


class Worker:
    def __init__(self, name: str, *args):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve_engine, args=(child, name, args), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise RuntimeError(f"{name} worker failed to start")

    def ask(self, kind: str, payload):
        self.conn.send((kind, payload))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join()


def compare(engines: dict[str, Worker], prompts: dict[int, list[int]], rounds: int) -> dict:
    """Engines take turns on every configuration (the machine's load drifts); the best of `rounds` runs counts."""
    for engine in engines.values():
        engine.ask("warm", prompts[min(prompts)][:8])
    results = {}
    for n, ids in prompts.items():
        for adapter in (False, True):
            runs = {name: [] for name in engines}
            order = list(engines)
            for r in range(rounds):  # rotate who goes first: no engine always follows the same one
                for name in order[r % len(order):] + order[:r % len(order)]:
                    time.sleep(0.5)  # let the previous engine's spinning worker threads go idle
                    runs[name].append(engines[name].ask("run", (ids, adapter)))
            results[(n, adapter)] = {name: best(r) for name, r in runs.items()}
    return results


def batch_costs(ours: "Ortlora", adapter_file: Path, vocab: int, rounds: int) -> list[str]:
    """Four rows of 32-token prompts: prefill one by one vs right-padded together; decode with one adapter on all
    rows (exported graph) vs a mix of two adapters and the base (mixed-adapter graph: the gather's cost)."""
    from ortlora.runtime.engine import Row

    m = ours.model
    m.adapters.load(adapter_file, name="r16b")  # same weights, another adapter to the engine
    engine, store = m.engine, m.adapters
    prompts = [prompt_ids(32, vocab, seed=s) for s in range(4)]
    lines = []
    for label, names in (("same adapter", ["r16"] * 4), ("mixed r16/r16b/base", ["r16", "r16b", None, "r16"])):
        handles = [store.get(n) if n else None for n in names]
        pre = {False: [], True: []}
        dec = []
        for _ in range(rounds):
            for batched in (False, True):
                slots = [engine.acquire_slot() for _ in prompts]
                t = time.perf_counter()
                engine.prefill([Row(s, p, h) for s, p, h in zip(slots, prompts, handles)], batched=batched)
                pre[batched].append(time.perf_counter() - t)
                if batched:
                    t = time.perf_counter()
                    for _ in range(16):
                        engine.decode([Row(s, [7], h) for s, h in zip(slots, handles)])
                    dec.append(4 * 16 / (time.perf_counter() - t))
                for s in slots:
                    engine.release_slot(s)
        lines.append(f"4 rows, {label}: prefill per row {min(pre[False]):.3f}s, batched {min(pre[True]):.3f}s; "
                     f"decode {max(dec):.1f} tok/s (all rows)")
    store.unload("r16b")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/ortlora-bench-generate")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    ap.add_argument("--prompt-lengths", nargs="+", type=int, default=[32, 512])
    ap.add_argument("--rounds", type=int, default=3, help="runs per engine and configuration (best counts)")
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, peft_dir, folders, adapters = prepare(work, a.precisions)
    threads = len(os.sched_getaffinity(0))
    from ortlora.model_folder import ModelInfo

    table, extra = [], []
    for precision in a.precisions:
        vocab = ModelInfo.read(folders[precision]).vocab_size
        prompts = {n: prompt_ids(n, vocab) for n in a.prompt_lengths}
        max_len = max(a.prompt_lengths) + NEW_TOKENS + 8
        engines = {"ortlora": Worker("ortlora", folders[precision], adapters[precision], max_len),
                   "genai": Worker("genai", folders[precision], adapters[precision], max_len)}
        if precision == "fp32" and not a.no_torch:
            engines["PEFT"] = Worker("PEFT", model_dir, peft_dir, threads)
        for key, res in compare(engines, prompts, a.rounds).items():
            table.append((precision, *key, res))
        extra += [f"{precision}: {line}" for line in engines["ortlora"].ask("batch", (adapters[precision], vocab,
                                                                                       a.rounds))]
        for engine in engines.values():
            engine.close()

    nan = (float("nan"), float("nan"))
    print(f"\nrandom Qwen2.5-0.5B-shaped model, greedy, {NEW_TOKENS} new tokens, {threads} threads, best of "
          f"{a.rounds}; TTFT = time to first token (s), tok/s = decode tokens/s after the first")
    head = (f"{'prec':5s} {'prompt':>6s} {'adapter':>7s} | {'ortlora TTFT':>12s} {'tok/s':>6s} | {'genai TTFT':>10s} "
            f"{'tok/s':>6s} | {'PEFT TTFT':>9s} {'tok/s':>6s} | {'decode/genai':>12s} {'/PEFT':>6s} | "
            f"{'TTFT/genai':>10s} {'/PEFT':>6s}")
    print(head)
    print("-" * len(head))
    for precision, n, adapter, res in table:
        (ot, od), (gt, gd), (pt, pd) = res["ortlora"], res["genai"], res.get("PEFT", nan)
        print(f"{precision:5s} {n:6d} {'r16' if adapter else '-':>7s} | {ot:12.3f} {od:6.1f} | {gt:10.3f} {gd:6.1f} | "
              f"{pt:9.3f} {pd:6.1f} | {od / gd:11.2f}x {od / pd:5.2f}x | {ot / gt:9.2f}x {ot / pt:5.2f}x")
    by_key = {(p, n, ad): res for p, n, ad, res in table}
    for precision in a.precisions:
        for n in a.prompt_lengths:
            base, lora = by_key[(precision, n, False)]["ortlora"], by_key[(precision, n, True)]["ortlora"]
            print(f"ortlora adapter overhead, {precision}, prompt {n}: decode {100 * (base[1] / lora[1] - 1):+.1f}%, "
                  f"TTFT {100 * (lora[0] / base[0] - 1):+.1f}%")
    for line in extra:
        print(line)


if __name__ == "__main__":
    main()
