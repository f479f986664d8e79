"""`ortlora serve`: an OpenAI-compatible server for one model and many LoRA adapters, batched together.

    ortlora serve -m out --adapters adapters/ --port 8000
    curl localhost:8000/v1/completions -d '{"model": "acme-support", "prompt": "Hello", "max_tokens": 16}'
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
from pathlib import Path

from ortlora.errors import OrtloraError


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


def main(args: argparse.Namespace) -> int:
    return serve(model=args.model, adapters=args.adapters, host=args.host, port=args.port, max_batch=args.max_batch,
                 max_loaded_adapters=args.max_loaded_adapters, max_queue=args.max_queue,
                 max_model_len=args.max_model_len, tenants=args.tenants, model_name=args.model_name,
                 threads=args.threads, insecure_no_auth=args.insecure_no_auth, log_level=args.log_level)


def serve(model: str | Path, *, adapters: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 16, max_loaded_adapters: int = 64, max_queue: int = 256, max_model_len: int | None = None,
          tenants: str | Path | None = None, model_name: str | None = None, threads: int | None = None,
          insecure_no_auth: bool = False, log_level: str = "info") -> int:
    """Build the server and run it until SIGINT/SIGTERM (which drain: in-flight requests finish first)."""
    try:
        import uvicorn

        from ortlora.serve.app import create_app
    except ModuleNotFoundError as exc:
        raise OrtloraError(f"serve needs the serve extra ({exc.name} is missing): pip install ortlora[serve]") from None
    from ortlora.serve.server import Server
    from ortlora.serve.tenants import Tenants

    if tenants is None and not insecure_no_auth and not _loopback(host):
        raise OrtloraError(f"refusing to serve on {host} without --tenants: any caller could use and manage "
                           "adapters (use --tenants tenants.toml, or --insecure-no-auth if that is intended)")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Server(model, adapters=adapters, tenants=Tenants.load(tenants) if tenants else None,
                    max_batch=max_batch, max_loaded_adapters=max_loaded_adapters, max_queue=max_queue,
                    max_model_len=max_model_len, model_name=model_name, threads=threads)
    log = logging.getLogger("ortlora.serve")
    for skipped in server.registry.skipped:
        log.warning("adapter skipped: %s", skipped)
    log.info("model %s (%s), %d adapters registered, batch %d, context %d", server.model_name, model,
             len(server.registry), max_batch, server.context_length)
    config = uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=120, access_log=log_level == "debug")
    # uvicorn re-raises the signal that stopped it once it has drained; after a clean drain SIGTERM exits 0
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        _DrainingServer(config, server).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


class _DrainingServer:
    """uvicorn's server, plus: on SIGTERM/SIGINT the scheduler refuses new work at once (503) while uvicorn closes
    the listening socket and waits for in-flight responses."""

    def __new__(cls, config, server):
        import uvicorn

        class Draining(uvicorn.Server):
            def handle_exit(self, sig, frame):
                server.scheduler.drain()
                super().handle_exit(sig, frame)

        return Draining(config)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
