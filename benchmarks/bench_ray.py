"""Scale-out on Ray Serve: aggregate throughput of `ortlora serve --replicas N` vs the single-process server, and
Ray's own overhead, on the random Qwen2.5-0.5B-shaped model of bench_serve.py (fp32). Not a test: one pass, printed.

    python benchmarks/bench_ray.py [--workdir /tmp/ortlora-bench-serve] [--repeats 2]

Every configuration is a real `ortlora serve` process (the Ray ones each start their own local Ray instance):
    single-x2   the single-process server, 2 onnxruntime threads
    single-x1   the same with 1 thread (the baseline of Ray's overhead)
    ray-1x1     1 engine replica x 1 thread
    ray-2x1     2 engine replicas x 1 thread
Measured: 16 concurrent streamed requests spread over 8 rank-16 adapters (32-token prompts, 64 new tokens, greedy,
ignore EOS), aggregate tokens/s and time to first token; and the latency of a 1-token request (p50 of 20 in a row,
one adapter), whose difference between `ray-1x1` and `single-x1` is what Ray adds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import N_ADAPTERS, NEW, PROMPT, _wave, best, prepare, prompts  # noqa: E402

import bench_serve  # noqa: E402

CONCURRENT = 16
CONFIGS = {"single-x2": [], "single-x1": [], "ray-1x1": ["--replicas", "1"], "ray-2x1": ["--replicas", "2"]}


def start(folder: Path, adapters: Path, name: str, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = "2" if name == "single-x2" else "1"
    proc = subprocess.Popen([sys.executable, "-m", "ortlora.cli", "serve", "-m", str(folder), "--adapters",
                             str(adapters), "--port", str(port), "--max-batch", str(CONCURRENT), "--threads", threads,
                             "--max-model-len", str(PROMPT + NEW + 8), "--log-level", "warning", *CONFIGS[name]],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def one_token_ms(url: str, vocab: int) -> float:
    import httpx

    ids = prompts(1, vocab, 7)[0][:8]
    times = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(21):
            t0 = time.perf_counter()
            r = client.post("/v1/completions", json={"model": "a0", "prompt": ids, "max_tokens": 1, "temperature": 0})
            times.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
    return statistics.median(times[1:])


def bench(folder: Path, adapters: Path, name: str, vocab: int, log: Path) -> dict:
    proc, url = start(folder, adapters, name, log)
    try:
        names = [f"a{i}" for i in range(N_ADAPTERS)]
        models = [names[i % N_ADAPTERS] for i in range(CONCURRENT)]
        asyncio.run(_wave(url, names, prompts(N_ADAPTERS, vocab, 99)))  # warm-up: loads, routing, arenas
        batch = prompts(CONCURRENT, vocab, CONCURRENT)
        out = best(lambda: asyncio.run(_wave(url, models, batch)))
        out["1tok_ms"] = one_token_ms(url, vocab)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/ortlora-bench-serve")
    ap.add_argument("--source", default="/tmp/ortlora-bench-generate", help="checkpoint + exports (shared)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=1, help="keep the best of this many runs of each measurement")
    a = ap.parse_args()
    bench_serve.REPEATS = a.repeats
    work, source = Path(a.workdir), Path(a.source)
    work.mkdir(parents=True, exist_ok=True)
    source.mkdir(parents=True, exist_ok=True)
    _, _, folders, adapter_dirs = prepare(source, work, ["fp32"])
    from ortlora.model_folder import ModelInfo

    folder, adapters = folders["fp32"], adapter_dirs["fp32"]
    vocab = ModelInfo.read(folder).vocab_size
    print(f"{len(os.sched_getaffinity(0))} cores; {CONCURRENT} concurrent requests over {N_ADAPTERS} adapters, "
          f"{PROMPT}-token prompts, {NEW} new tokens")
    print(f"{'config':<10} {'tok/s':>7} {'ttft p50':>9} {'ttft p99':>9} {'1-token req':>12}")
    for name in a.configs:
        r = bench(folder, adapters, name, vocab, work / f"bench-ray-{name}.log")
        print(f"{name:<10} {r['tok/s']:7.1f} {r['ttft_p50']:8.2f}s {r['ttft_p99']:8.2f}s {r['1tok_ms']:10.1f}ms",
              flush=True)


if __name__ == "__main__":
    main()
