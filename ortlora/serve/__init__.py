"""`ortlora serve`: OpenAI-compatible HTTP server, continuous batching across adapters, tenants, metrics."""

from __future__ import annotations

import ipaddress
import logging
import signal
from pathlib import Path

from ortlora.errors import OrtloraError


def serve(model: str | Path, *, adapters: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 16, max_loaded_adapters: int = 64, max_queue: int = 256, max_model_len: int | None = None,
          tenants: str | Path | None = None, model_name: str | None = None, threads: int | None = None,
          insecure_no_auth: bool = False, log_level: str = "info", prefill_chunk: int | None = None,
          provider: str | None = None, replicas: str | None = None, ray_address: str | None = None,
          max_num_batched_tokens: int | None = None, max_lora_rank: int = 64) -> int:
    """Build the server and run it until SIGINT/SIGTERM (which drain: in-flight requests finish first).
    `provider` overrides genai_config.json's execution provider (e.g. "cpu"). With `replicas` (N or MIN:MAX) the
    same API runs on Ray Serve over that many engine replicas (ortlora.serve.ray), on a local Ray instance or the
    cluster at `ray_address`."""
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
    if replicas is not None or ray_address is not None:
        from ortlora.serve.ray import AppArgs, serve_ray  # ray is imported only here

        args = AppArgs.parse(dict(model=str(model), adapters=adapters and str(adapters),
                                  tenants=tenants and str(tenants), replicas=replicas or "1", threads=threads,
                                  max_batch=max_batch, max_loaded_adapters=max_loaded_adapters, max_queue=max_queue,
                                  max_model_len=max_model_len, model_name=model_name, prefill_chunk=prefill_chunk,
                                  provider=provider, max_num_batched_tokens=max_num_batched_tokens,
                                  max_lora_rank=max_lora_rank))
        return serve_ray(args, host=host, port=port, ray_address=ray_address, log_level=log_level)
    server = Server(model, adapters=adapters, tenants=Tenants.load(tenants) if tenants else None,
                    max_batch=max_batch, max_loaded_adapters=max_loaded_adapters, max_queue=max_queue,
                    max_model_len=max_model_len, model_name=model_name, threads=threads, prefill_chunk=prefill_chunk,
                    provider=provider, max_num_batched_tokens=max_num_batched_tokens, max_lora_rank=max_lora_rank)
    log = logging.getLogger("ortlora.serve")
    directory = server.adapters.directory
    for skipped in directory.skipped if directory else ():
        log.warning("adapter skipped: %s", skipped)
    for removed in directory.removed if directory else ():
        log.warning("removed %s: left by an interrupted upload", removed.name)
    log.info("model %s (%s), %d adapters registered, batch %d, context %d", server.model_name, model,
             len(server.adapters.names()), max_batch, server.context_length)
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
