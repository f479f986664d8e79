"""One request never hurts another, measured on a random Qwen2.5-0.5B-shaped model (`--precision`, fp32 by
default), server defaults.
Not a test: one pass, printed; each scenario side by side with its baseline in the same run.

    python benchmarks/bench_isolation.py [--workdir /tmp/ortlora-bench-isolation] [--scenarios gap huge fair]
        [--precision fp32|int4|int8]

gap:  4 streams decode (200 new tokens each); after their 20th token a 1500-token prompt arrives. The streams'
      median and largest inter-token gap, and the long prompt's time to first token: with the default step budget
      (prompt work while streams decode sized so a step takes at most ~2.5 decode steps) vs `--prefill-chunk 2048`
      (the whole prompt in one piece).
chunks: the same at engine level, no HTTP (Batch steps timed directly): the calibrated run cost (fixed part + per
      token), the step budget, the chunks the planner chose, the longest step against a plain decode step, and the
      long prompt's TTFT, budgeted vs one piece.
huge: a 15 MB prompt, three times, while a short request runs: the 4xx time, the short request's latency against
      its latency alone, and the server's RSS before and after.
fair: tenant beta sends 200 requests at once (its own process), tenant acme 10 shortly after: acme's p99 latency
      next to the flood against acme alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import prepare  # noqa: E402

ACME, BETA = "acme-key", "beta-key"


class Server:
    def __init__(self, folder: Path, adapters: Path, log: Path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ortlora.cli", "serve", "-m", str(folder), "--adapters", str(adapters),
               "--port", str(self.port), "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not come up")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _stream_times(url, key, body, times, ready):
    with httpx.Client(base_url=url, headers=_auth(key), timeout=600) as c:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    times.append(time.perf_counter())
                    if len(times) == 20:
                        ready.set()


def gap(folder, adapters, work, chunk: str | None) -> dict:
    args = ["--prefill-chunk", chunk] if chunk else []
    server = Server(folder, adapters, work / f"gap-{chunk or 'default'}.log", *args)
    try:
        streams, threads, readies = [], [], []
        for i in range(4):
            times, ready = [], threading.Event()
            body = {"model": f"a{i}", "prompt": f"stream {i} " * 8, "max_tokens": 200, "temperature": 0,
                    "ignore_eos": True}
            t = threading.Thread(target=_stream_times, args=(server.url, "", body, times, ready))
            t.start()
            streams.append(times)
            threads.append(t)
            readies.append(ready)
        for r in readies:
            r.wait(600)
        long_prompt = [10 + (7 * i) % 290 for i in range(1500)]  # token ids: exactly 1500 tokens
        t0 = time.perf_counter()
        r = httpx.post(server.url + "/v1/completions", timeout=600,
                       json={"model": "a4", "prompt": long_prompt, "max_tokens": 1, "temperature": 0})
        ttft = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
        for t in threads:
            t.join(600)
        window = [b - a for s in streams for a, b in zip(s, s[1:]) if a >= t0 - 1]
        median = statistics.median(window)
        return {"median_gap_ms": 1000 * median, "max_gap_ms": 1000 * max(window),
                "p99_gap_ms": 1000 * statistics.quantiles(window, n=100)[98],
                "over_3x": sum(g > 3 * median for g in window), "gaps": len(window),
                "long_ttft_s": ttft, "long_prompt_tokens": prompt_tokens}
    finally:
        server.stop()


async def _timed(url, key, model, n, tokens, prompt="question"):
    async with httpx.AsyncClient(base_url=url, headers=_auth(key), timeout=600,
                                 limits=httpx.Limits(max_connections=n)) as c:
        async def one(i):
            t0 = time.perf_counter()
            r = await c.post("/v1/completions", json={"model": model, "prompt": f"{prompt} {i}",
                                                      "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
            return r.status_code, time.perf_counter() - t0
        return await asyncio.gather(*(one(i) for i in range(n)))


def chunks(folder, chunk: int | None) -> dict:
    from ortlora.runtime.batch import Batch
    from ortlora.runtime.model import Model
    from ortlora.runtime.request import Request
    from ortlora.runtime.sampling import SamplingParams

    m = Model(folder, slots=8, max_len=2048, prefix_cache_bytes=0)
    batch = Batch(m.engine, m.adapters, prefill_chunk=chunk)
    batch.calibrate()
    fixed, per_token = batch.budget.fixed, batch.budget.per_token
    for i in range(4):
        batch.add(Request([10 + i] * 16, SamplingParams(max_new_tokens=400, ignore_eos=True), m.tokenizer))
    for _ in range(20):
        batch.step()
    t0 = time.perf_counter()
    long = Request([10 + (7 * i) % 290 for i in range(1500)], SamplingParams(max_new_tokens=1), m.tokenizer)
    batch.add(long)
    steps, pieces = [], []
    while not long.finished:
        s = time.perf_counter()
        batch.step()
        steps.append(time.perf_counter() - s)
        pieces += [p.tokens for r in batch.last_runs for p in r.pieces if p.key is long]
    ttft = time.perf_counter() - t0
    plain = []
    for _ in range(10):
        s = time.perf_counter()
        batch.step()
        plain.append(time.perf_counter() - s)
    return {"fixed_s": fixed, "per_token_ms": 1000 * per_token, "budget": batch.budget.tokens(4),
            "chunk": statistics.median(pieces), "runs": len(steps), "max_step_s": max(steps),
            "decode_step_s": statistics.median(plain), "ttft_s": ttft}


def huge(folder, adapters, work) -> dict:
    server = Server(folder, adapters, work / "huge.log")
    try:
        short = lambda: asyncio.run(_timed(server.url, "", "a0", 1, 8))[0]  # noqa: E731
        alone = min(short()[1] for _ in range(3))
        before = server.rss_mb()
        body = {"model": "a0", "prompt": "lorem ipsum " * (15_000_000 // 12), "max_tokens": 4}
        refusals, concurrent = [], []
        for _ in range(3):
            out = {}
            t = threading.Thread(target=lambda: out.update(r=short()))
            t0 = time.perf_counter()
            t.start()
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=600)
            refusals.append((r.status_code, time.perf_counter() - t0))
            t.join()
            concurrent.append(out["r"][1])
        return {"refused": [s for s, _ in refusals], "refusal_s": max(t for _, t in refusals),
                "short_alone_s": alone, "short_meanwhile_s": max(concurrent), "rss_before_mb": before,
                "rss_after_mb": server.rss_mb()}
    finally:
        server.stop()


FLOOD = """
import asyncio, sys, httpx
async def main():
    async with httpx.AsyncClient(base_url=sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]},
                                 timeout=1200, limits=httpx.Limits(max_connections=200)) as c:
        async def one(i):
            r = await c.post("/v1/completions", json={"model": "a1", "prompt": "flood %d" % i, "max_tokens": 32,
                                                      "temperature": 0, "ignore_eos": True})
            return r.status_code
        print(sorted(set(await asyncio.gather(*(one(i) for i in range(200))))))
asyncio.run(main())
"""


def fair(folder, adapters, work) -> dict:
    from ortlora.serve.tenants import hash_key

    tenants = work / "tenants.toml"
    tenants.write_text(f'[tenants.acme]\napi_key_sha256 = ["{hash_key(ACME)}"]\nadapters = ["*"]\n'
                       f'[tenants.beta]\napi_key_sha256 = ["{hash_key(BETA)}"]\nadapters = ["*"]\n')
    server = Server(folder, adapters, work / "fair.log", "--tenants", str(tenants))
    try:
        p99 = lambda xs: sorted(xs)[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]  # noqa: E731
        alone = asyncio.run(_timed(server.url, ACME, "a0", 10, 32))
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, server.url, BETA], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/health").json()["waiting"] < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        few = asyncio.run(_timed(server.url, ACME, "a0", 10, 32))
        out, _ = flood.communicate(timeout=3600)
        return {"acme_ok": sum(s == 200 for s, _ in few), "acme_p99_alone_s": p99([t for _, t in alone]),
                "acme_p99_flood_s": p99([t for _, t in few]), "flood_statuses": out.strip()}
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/ortlora-bench-isolation")
    ap.add_argument("--source", default="/tmp/ortlora-bench-generate", help="checkpoint + exports (shared)")
    ap.add_argument("--scenarios", nargs="+", default=["gap", "huge", "fair"],
                    choices=["gap", "chunks", "huge", "fair"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int4", "int8"], help="the export to serve")
    args = ap.parse_args()
    work, source = Path(args.workdir), Path(args.source)
    work.mkdir(parents=True, exist_ok=True)
    source.mkdir(parents=True, exist_ok=True)
    _, _, folders, adapter_dirs = prepare(source, work, [args.precision])
    folder, adapters = folders[args.precision], adapter_dirs[args.precision]
    results = {}
    if "gap" in args.scenarios:
        results["gap"] = {"one piece (--prefill-chunk 2048)": gap(folder, adapters, work, "2048"),
                          "budgeted (default)": gap(folder, adapters, work, None)}
        for name, r in results["gap"].items():
            print(f"gap  {name:34s} streams' median gap {r['median_gap_ms']:.0f} ms, p99 {r['p99_gap_ms']:.0f} ms, max "
                  f"{r['max_gap_ms']:.0f} ms ({r['max_gap_ms'] / r['median_gap_ms']:.1f}x; {r['over_3x']} of "
                  f"{r['gaps']} gaps over 3x); long prompt ({r['long_prompt_tokens']} tokens) TTFT "
                  f"{r['long_ttft_s']:.2f} s", flush=True)
        a, b = results["gap"].values()
        print(f"gap  budgeted / one piece: long-prompt TTFT {b['long_ttft_s'] / a['long_ttft_s']:.2f}x")
    if "chunks" in args.scenarios:
        results["chunks"] = {"one piece": chunks(folder, 2048), "budgeted": chunks(folder, None)}
        for name, r in results["chunks"].items():
            print(f"chunks {name:9s} prefill run {r['fixed_s']:.3f} s + {r['per_token_ms']:.2f} ms/token; budget "
                  f"{r['budget']:.0f} tokens, chunks of {r['chunk']:.0f} over {r['runs']} steps; longest step "
                  f"{r['max_step_s']:.3f} s vs decode step {r['decode_step_s']:.3f} s "
                  f"({r['max_step_s'] / r['decode_step_s']:.1f}x); long prompt's TTFT {r['ttft_s']:.2f} s", flush=True)
        a, b = results["chunks"].values()
        print(f"chunks budgeted / one piece: long-prompt TTFT {b['ttft_s'] / a['ttft_s']:.2f}x")
    if "huge" in args.scenarios:
        r = results["huge"] = huge(folder, adapters, work)
        print(f"huge 15 MB prompt x3: {r['refused']} in at most {r['refusal_s']:.2f} s; a short request meanwhile "
              f"{r['short_meanwhile_s']:.2f} s (alone {r['short_alone_s']:.2f} s); RSS {r['rss_before_mb']:.0f} -> "
              f"{r['rss_after_mb']:.0f} MB", flush=True)
    if "fair" in args.scenarios:
        r = results["fair"] = fair(folder, adapters, work)
        print(f"fair acme {r['acme_ok']}/10 ok; p99 alone {r['acme_p99_alone_s']:.2f} s, next to beta's flood of 200 "
              f"{r['acme_p99_flood_s']:.2f} s ({r['acme_p99_flood_s'] / r['acme_p99_alone_s']:.2f}x); beta's "
              f"statuses {r['flood_statuses']}", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
