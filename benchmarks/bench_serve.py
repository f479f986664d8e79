"""Serving many adapters at once: `ortlora serve` vs onnxruntime-genai vs PEFT, on a random Qwen2.5-0.5B-shaped
model (fp32 and int4), 32-token prompts, 64 new tokens, greedy, ignore EOS. Not a test: one pass, printed.

    python benchmarks/bench_serve.py [--workdir /tmp/ortlora-bench-serve] [--precisions fp32 int4]

(a) the ortlora server (a real process, HTTP + SSE), N concurrent requests spread over 8 rank-16 adapters
    ("mixed"), all on one adapter ("same"), and on the base model ("base");
(b) onnxruntime-genai with the same adapter files: one Generator per request, in threads (it cannot batch them);
(c) onnxruntime-genai's Engine on the base model, no adapters (its best case), static batch size = N;
(d) PEFT on PyTorch, one batch of N rows with a different adapter per row (`adapter_names=`).
Plus the engine alone (no HTTP): one decode step at batch N, and the cold-load time of one adapter.

onnxruntime-genai runs at its best: intra_op_num_threads = cores (export writes it), search.max_length = 96 (so
its KV buffers are sized like ours), Engine max_batch_size >= N, set in a copy of genai_config.json.
The checkpoint and exports are shared with bench_generate.py's work folder when it exists.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _models import qwen25_05b  # noqa: E402

PROMPT, NEW = 32, 64
N_ADAPTERS = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- artifacts ---------------------------------------------------------------------------------------------------
def prepare(source: Path, work: Path, precisions: list[str]):
    """The checkpoint, 8 PEFT rank-16 adapters, exports with LoRA inputs, and the adapters converted per export."""
    from safetensors.numpy import load_file, save_file

    from ortlora.adapters.convert import convert_adapter
    from ortlora.export import export
    from ortlora.testing import build_adapter

    model = qwen25_05b(source / "qwen2.5-0.5b-random")
    peft = []
    for i in range(N_ADAPTERS):
        d = work / f"peft-{i}"
        if not (d / "adapter_config.json").is_file():
            if i == 0:
                build_adapter(model, d, r=16, alpha=32, target_modules=TARGETS, std=0.02)
            else:  # the same layout, other random weights: no need to load the model again
                shutil.copytree(peft[0], d)
                f = d / "adapter_model.safetensors"
                rng = np.random.default_rng(i)
                save_file({k: (rng.standard_normal(v.shape) * 0.02).astype(v.dtype) for k, v in load_file(f).items()},
                          str(f))
        peft.append(d)
    folders, adapter_dirs = {}, {}
    for precision in precisions:
        out = source / f"onnx-{precision}"
        if not (out / "genai_config.json").is_file():
            export(model, out, adapter_path=[peft[0]], precision=precision, progress=False)
        folders[precision] = out
        adapter_dirs[precision] = work / f"adapters-{precision}"
        adapter_dirs[precision].mkdir(exist_ok=True)
        for i, d in enumerate(peft):
            f = adapter_dirs[precision] / f"a{i}.onnx_adapter"
            if not f.is_file():
                convert_adapter(d, f, model=out)
    return model, peft, folders, adapter_dirs


def genai_folder(folder: Path, work: Path, batch: int) -> Path:
    """A folder of links to `folder` with a genai_config.json tuned for this run (folder itself is not touched)."""
    out = work / f"genai-{folder.name}-b{batch}"
    out.mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f.name != "genai_config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((folder / "genai_config.json").read_text())
    cfg["search"]["max_length"] = PROMPT + NEW
    cfg["engine"] = {"static_batching": {"max_batch_size": batch}}
    threads = cfg["model"]["decoder"].setdefault("session_options", {}).get("intra_op_num_threads")
    assert threads == len(os.sched_getaffinity(0)), f"genai_config.json threads {threads}"
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, min(vocab, 150000) - 10, PROMPT).tolist() for _ in range(n)]


REPEATS = 1  # --repeats: the best of a few runs of each measurement (a shared machine is noisy)


def best(measure) -> dict:
    return max((measure() for _ in range(REPEATS)), key=lambda r: r["tok/s"])


def summary(tokens: int, wall: float, ttfts: list[float]) -> dict:
    q = np.quantile(ttfts, [0.5, 0.99])
    return {"tok/s": tokens / wall, "ttft_p50": float(q[0]), "ttft_p99": float(q[1]), "wall": wall}


# -- (a) the ortlora server ----------------------------------------------------------------------------------------
async def _wave(url: str, models: list[str], batch: list[list[int]]) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        t0 = time.perf_counter()

        async def one(model, ids):
            body = {"model": model, "prompt": ids, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            first, tokens = None, 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and first is None:
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            return first, tokens

        results = await asyncio.gather(*(one(m, ids) for m, ids in zip(models, batch)))
        wall = time.perf_counter() - t0
    assert all(t == NEW for _, t in results), results
    return summary(sum(t for _, t in results), wall, [f for f, _ in results])


def bench_server(folder: Path, adapters: Path, concurrency: list[int], vocab: int, log: Path) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ortlora.cli", "serve", "-m", str(folder), "--adapters", str(adapters),
                             "--port", str(port), "--max-batch", str(max(concurrency)), "--max-model-len",
                             str(PROMPT + NEW + 8), "--log-level", "warning"], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    out = {}
    try:
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        names = [f"a{i}" for i in range(N_ADAPTERS)]
        asyncio.run(_wave(url, names, prompts(N_ADAPTERS, vocab, 99)))  # warm-up: loads, graphs, arenas
        for n in concurrency:
            batch = prompts(n, vocab, n)
            for mode, models in (("mixed", [names[i % N_ADAPTERS] for i in range(n)]), ("same", ["a0"] * n),
                                 ("base", [folder.name] * n)):
                out[(mode, n)] = best(lambda: asyncio.run(_wave(url, models, batch)))
        metrics = httpx.get(url + "/metrics").text
        out["max_adapters_per_step"] = next(float(line.split()[-1]) for line in metrics.splitlines()
                                            if line.startswith("ortlora_decode_batch_adapters_max"))
        shutil.copy(adapters / "a1.onnx_adapter", adapters / "cold.onnx_adapter")
        with httpx.Client(base_url=url) as client:  # a client that keeps its connection, as an admin tool would
            client.get("/health")
            t0 = time.perf_counter()
            r = client.post("/v1/adapters", json={"name": "cold2", "path": "cold.onnx_adapter"})
            out["http_load_ms"] = (time.perf_counter() - t0) * 1000
        assert r.status_code == 200 and r.json()["loaded"], r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        (adapters / "cold.onnx_adapter").unlink(missing_ok=True)
    return out


# -- (b), (c) onnxruntime-genai -------------------------------------------------------------------------------------
def bench_genai_generators(folder: Path, adapters: Path, n: int, vocab: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    og_adapters = og.Adapters(model)
    for i in range(N_ADAPTERS):
        og_adapters.load(str(adapters / f"a{i}.onnx_adapter"), f"a{i}")
    batch = prompts(n, vocab, n)

    def run(i, t0, firsts, counts):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=PROMPT + NEW, min_length=PROMPT + NEW, do_sample=False)
        gen = og.Generator(model, params)
        gen.set_active_adapter(og_adapters, f"a{i % N_ADAPTERS}")
        gen.append_tokens([batch[i]])
        count = 0
        while not gen.is_done():
            gen.generate_next_token()
            count += 1
            if count == 1:
                firsts[i] = time.perf_counter() - t0
        counts[i] = count
        del gen

    def wave(k):
        firsts, counts = [0.0] * k, [0] * k
        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i, t0, firsts, counts)) for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        assert all(c == NEW for c in counts), counts
        return summary(sum(counts), wall, firsts)

    wave(2)  # warm-up
    out = best(lambda: wave(n))
    return out


def bench_genai_engine(folder: Path, n: int, vocab: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    engine = og.Engine(model)
    assert engine.get_capabilities().configured_max_batch_size >= n
    buf = engine.create_event_buffer(4 * n)

    def wave(batch):
        t0 = time.perf_counter()
        requests, firsts, counts = [], {}, {}
        for ids in batch:
            req = engine.create_request()
            opts = og.TurnOptions(req)
            opts.set_max_generated_tokens(NEW)
            opts.set_min_generated_tokens(NEW)
            opts.set_temperature(0.0)
            req.begin_turn(np.asarray(ids, np.int32), opts)
            requests.append(req)
        index = {id(r): i for i, r in enumerate(requests)}
        while engine.has_pending_requests():
            for ev in engine.run(buf):
                i = index[id(ev.request)]
                if ev.flags & og.EngineEventFlags.TOKEN:
                    counts[i] = counts.get(i, 0) + 1
                    firsts.setdefault(i, time.perf_counter() - t0)
        wall = time.perf_counter() - t0
        for r in requests:
            r.close()
        assert all(counts.get(i) == NEW for i in range(len(batch))), counts
        return summary(sum(counts.values()), wall, list(firsts.values()))

    wave(prompts(2, vocab, 1))
    out = best(lambda: wave(prompts(n, vocab, n)))
    return out


# -- (d) PEFT ---------------------------------------------------------------------------------------------------------
def bench_peft(model_dir: Path, peft: list[Path], concurrency: list[int], vocab: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, peft[0], adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        model.load_adapter(peft[i], adapter_name=f"a{i}")
    model.eval()

    def wave(n):
        ids = torch.tensor(prompts(n, vocab, n))
        names = [f"a{i % N_ADAPTERS}" for i in range(n)]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(ids, use_cache=True, logits_to_keep=1, adapter_names=names)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            first = time.perf_counter() - t0
            past = out.past_key_values
            for _ in range(NEW - 1):
                out = model(tok, past_key_values=past, use_cache=True, adapter_names=names)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return summary(n * NEW, time.perf_counter() - t0, [first] * n)

    wave(2)
    out = {n: best(lambda: wave(n)) for n in concurrency}
    return out


# -- the engine alone; cold load -------------------------------------------------------------------------------------
def bench_engine(folder: Path, adapters: Path, concurrency: list[int], vocab: int) -> dict:
    """Decode tok/s of the runtime engine, no HTTP: base, one adapter for all rows, a different adapter per row."""
    from ortlora.runtime.adapters import Adapters
    from ortlora.runtime.engine import Engine, Row

    engine = Engine(folder, slots=max(concurrency), max_len=PROMPT + NEW + 8)
    store = Adapters.for_engine(engine)
    held = [store.load(adapters / f"a{i}.onnx_adapter", f"a{i}") for i in range(N_ADAPTERS)]
    out = {}
    for n in concurrency:
        for mode in ("base", "same", "mixed"):
            pick = {"base": lambda i: None, "same": lambda i: held[0], "mixed": lambda i: held[i % N_ADAPTERS]}[mode]
            slots = [engine.acquire_slot() for _ in range(n)]
            for i, s in enumerate(slots):
                engine.prefill([Row(s, prompts(1, vocab, i)[0], pick(i))])
            rows = [Row(s, [11], pick(i)) for i, s in enumerate(slots)]
            engine.decode(rows)  # warm-up (builds the mixed graph and the stacks)
            steps = 24
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.decode(rows)
            out[(mode, n)] = n * steps / (time.perf_counter() - t0)
            for s in slots:
                engine.release_slot(s)
    return out


def cold_load_ms(folder: Path, adapters: Path) -> tuple[float, float]:
    """(median ms to load one rank-16 adapter into fresh Adapters: parse, check, private copy, finite check; not the
    probe step, which is one short prefill; median ms to place one in the adapter pool, which a mixed batch does
    the first time it meets that adapter)."""
    import numpy as np

    from ortlora.model_folder import model_lora_inputs
    from ortlora.runtime.adapters import Adapters
    from ortlora.runtime.pool import AdapterPool

    lora_inputs = model_lora_inputs(folder)
    times = []
    for k in range(7):
        store = Adapters(lora_inputs)
        t0 = time.perf_counter()
        store.load(adapters / f"a{k % N_ADAPTERS}.onnx_adapter", "x")
        times.append((time.perf_counter() - t0) * 1000)
    held = [Adapters(lora_inputs).load(adapters / f"a{i}.onnx_adapter", "x") for i in range(N_ADAPTERS)]
    dtype = next(iter(held[0].params.values())).dtype
    pool = AdapterPool(lora_inputs, N_ADAPTERS, np.dtype(dtype))
    pool.place({held[0].uid: held[0]})  # allocates the buffers
    places = []
    for a in held[1:]:
        t0 = time.perf_counter()
        pool.place({a.uid: a})
        places.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), statistics.median(places)


# -- main ---------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/ortlora-bench-serve")
    ap.add_argument("--source", default="/tmp/ortlora-bench-generate", help="checkpoint + exports (shared)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--skip", nargs="*", default=[], choices=["server", "genai", "engine", "peft"],
                    help="columns to leave out (e.g. to rerun one in a quiet moment of a shared machine)")
    ap.add_argument("--repeats", type=int, default=1, help="keep the best of this many runs of each measurement")
    a = ap.parse_args()
    global REPEATS
    REPEATS = a.repeats
    work, source = Path(a.workdir), Path(a.source)
    work.mkdir(parents=True, exist_ok=True)
    source.mkdir(parents=True, exist_ok=True)
    model_dir, peft, folders, adapter_dirs = prepare(source, work, a.precisions)
    from ortlora.model_folder import ModelInfo

    cores = len(os.sched_getaffinity(0))
    report = []
    for precision in a.precisions:
        folder, adapters = folders[precision], adapter_dirs[precision]
        vocab = ModelInfo.read(folder).vocab_size
        load_ms, stack_ms = cold_load_ms(folder, adapters)
        server = (bench_server(folder, adapters, a.concurrency, vocab, work / f"server-{precision}.log")
                  if "server" not in a.skip else {})
        engine = bench_engine(folder, adapters, a.concurrency, vocab) if "engine" not in a.skip else {}
        rows = {}
        for n in a.concurrency:
            for mode in ("mixed", "same", "base") if server else ():
                rows.setdefault(f"(a) ortlora serve, {mode}", {})[n] = server[(mode, n)]
            if "genai" not in a.skip:
                g = genai_folder(folder, work, max(a.concurrency))
                rows.setdefault("(b) genai, generator per request", {})[n] = bench_genai_generators(g, adapters, n, vocab)
                rows.setdefault("(c) genai Engine, base (no adapters)", {})[n] = bench_genai_engine(g, n, vocab)
        if precision == "fp32" and "peft" not in a.skip:
            for n, r in bench_peft(model_dir, peft, a.concurrency, vocab).items():
                rows.setdefault("(d) PEFT mixed batch", {})[n] = r
        report.append((precision, rows, engine, server, load_ms, stack_ms))
        gc.collect()

    print(f"\nrandom Qwen2.5-0.5B-shaped model, {PROMPT}-token prompts, {NEW} new tokens, greedy, {cores} cores; "
          f"{N_ADAPTERS} rank-16 adapters on all linear layers; TTFT = time to first token (s)")
    for precision, rows, engine, server, load_ms, stack_ms in report:
        print(f"\n== {precision}")
        head = f"{'':40s}" + "".join(f" | {f'N={n} tok/s':>11s} {'TTFT p50':>8s} {'p99':>6s}" for n in a.concurrency)
        print(head)
        print("-" * len(head))
        for label, by_n in rows.items():
            print(f"{label:40s}" + "".join(f" | {by_n[n]['tok/s']:11.1f} {by_n[n]['ttft_p50']:8.2f} "
                                           f"{by_n[n]['ttft_p99']:6.2f}" for n in a.concurrency))
        if engine:
            for mode in ("base", "same", "mixed"):
                print(f"{'engine decode step only, ' + mode:40s}" + "".join(
                    f" | {engine[(mode, n)]:11.1f} {'':8s} {'':6s}" for n in a.concurrency))
        if server:
            summarize(rows, server, a.concurrency)
        print(f"cold load of one rank-16 adapter: {load_ms:.1f} ms into the store (mmap + check), "
              + (f"{server['http_load_ms']:.1f} ms through POST /v1/adapters; " if server else "")
              + f"placing one in the mixed-batch adapter pool: {stack_ms:.1f} ms")


def summarize(rows: dict, server: dict, concurrency: list[int]) -> None:
    mixed = rows["(a) ortlora serve, mixed"]
    for other, label in (("(b) genai, generator per request", "b"), ("(c) genai Engine, base (no adapters)", "c"),
                         ("(d) PEFT mixed batch", "d")):
        if other in rows:
            print(f"ratio (a) mixed / ({label}): " + ", ".join(
                f"N={n} {mixed[n]['tok/s'] / rows[other][n]['tok/s']:.2f}x" for n in concurrency))
    same = rows["(a) ortlora serve, same"]
    print("same-adapter vs mixed: " + ", ".join(
        f"N={n} {100 * (same[n]['tok/s'] / mixed[n]['tok/s'] - 1):+.1f}%" for n in concurrency))
    print(f"most distinct adapters in one decode step: {server['max_adapters_per_step']:.0f}")


if __name__ == "__main__":
    main()
