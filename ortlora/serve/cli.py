"""`ortlora serve`: an OpenAI-compatible server for one model and many LoRA adapters, batched together.

    ortlora serve -m out --adapters adapters/ --port 8000
    curl localhost:8000/v1/completions -d '{"model": "acme-support", "prompt": "Hello", "max_tokens": 16}'
"""

from __future__ import annotations

import argparse


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="exported model folder (ortlora export)")
    p.add_argument("--adapters", default=None,
                   help="folder of .onnx_adapter files, each served under its file stem (default: none)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--max-batch", type=int, default=16,
                   help="rows decoded together (KV cache slots; default: %(default)s)")
    p.add_argument("--max-loaded-adapters", type=int, default=64,
                   help="adapters held in memory (LRU; default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="waiting requests before answering 429 (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens prefilled per step while other requests decode (default: sized from measured "
                        "step times, so running streams keep their pace)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prompt tokens a step prefills while nothing decodes, many prompts packed per run "
                        "(default: 8192)")
    p.add_argument("--max-lora-rank", type=int, default=64,
                   help="adapters (and weighted combinations: the sum of their ranks) above this rank are refused "
                        "(default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="tokens per sequence (prompt + output); default min(context length, 4096)")
    p.add_argument("--tenants", default=None,
                   help="TOML file: API key hashes -> tenants -> adapters (default: none: any key, loopback only)")
    p.add_argument("--model-name", default=None, help="the base model's name in the API (default: folder name)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: genai_config)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without --tenants (anyone reaching it may use it)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="default: %(default)s")
    p.add_argument("--provider", default=None,
                   help="run on this execution provider (cpu, cuda, dml, ...) instead of the one genai_config.json "
                        "names; --provider cpu runs a GPU-exported folder on the CPU (default: genai_config.json's)")
    p.add_argument("--replicas", default=None, metavar="N|MIN:MAX",
                   help="serve on Ray Serve with N engine replicas (MIN:MAX: autoscaled on ongoing requests), each "
                        "request routed to a replica holding its adapter; needs ortlora[ray]")
    p.add_argument("--ray-address", default=None,
                   help="with --replicas: join this Ray cluster (default: start a local Ray instance on 127.0.0.1)")


def main(args: argparse.Namespace) -> int:
    from ortlora.serve import serve

    return serve(model=args.model, adapters=args.adapters, host=args.host, port=args.port, max_batch=args.max_batch,
                 max_loaded_adapters=args.max_loaded_adapters, max_queue=args.max_queue,
                 max_model_len=args.max_model_len, tenants=args.tenants, model_name=args.model_name,
                 threads=args.threads, insecure_no_auth=args.insecure_no_auth, log_level=args.log_level,
                 prefill_chunk=args.prefill_chunk, provider=args.provider,
                 max_num_batched_tokens=args.max_num_batched_tokens, max_lora_rank=args.max_lora_rank,
                 replicas=args.replicas, ray_address=args.ray_address)
