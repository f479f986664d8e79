"""Prefix caching: time to first token of requests that share a long system prompt per adapter. Not a test: printed.

    python benchmarks/bench_prefix.py FOLDER ADAPTER_DIR [--system 1000] [--question 20] [--threads N]

8 requests over 4 adapters (2 each, one after the other), each adapter with its own `--system`-token system prompt
and every request with its own `--question`-token question; greedy, 1 new token (the first token is the time asked
for). The first request of an adapter prefills everything; the second finds the system prompt cached (same adapter)
and prefills only the rest. Run once with the cache and once without (`prefix_cache_bytes=0`) in one process.
Prints one JSON line per setting: the TTFT of each request, the ratio second / first per adapter, and cache hits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("adapters", type=Path)
    ap.add_argument("--system", type=int, default=1000)
    ap.add_argument("--question", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import ortlora

    files = sorted(args.adapters.glob("*.onnx_adapter"))[:4]
    rng = np.random.default_rng(0)
    for cache_bytes in (512 << 20, 0):
        model = ortlora.Model(args.folder, slots=4, max_len=args.system + args.question + 8, threads=args.threads,
                              prefix_cache_bytes=cache_bytes)
        for f in files:
            model.adapters.load(f, name=f.stem)
        vocab = model.engine.info.vocab_size
        model.complete([[1, 2, 3]], max_new_tokens=1)  # warm-up
        ttft: dict[str, list[float]] = {}
        for f in files:
            system = rng.integers(0, vocab, args.system).tolist()
            for _ in range(2):
                prompt = system + rng.integers(0, vocab, args.question).tolist()
                t0 = time.perf_counter()
                for _chunk in model.stream(prompt, f.stem, max_new_tokens=1):
                    break
                ttft.setdefault(f.stem, []).append(round(time.perf_counter() - t0, 4))
        cache = model.engine.prefix_cache
        print(json.dumps({"prefix_cache_bytes": cache_bytes, "system": args.system, "question": args.question,
                          "ttft_s": ttft, "second_over_first": {k: round(v[1] / v[0], 3) for k, v in ttft.items()},
                          "hits": cache.hits if cache else 0, "hit_tokens": cache.hit_tokens if cache else 0}),
              flush=True)
        del model


if __name__ == "__main__":
    main()
