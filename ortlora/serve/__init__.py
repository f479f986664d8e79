"""`ortlora serve`: OpenAI-compatible HTTP server, continuous batching across adapters, tenants, metrics."""

from __future__ import annotations

import ipaddress
import logging
import signal

from ortlora.errors import OrtloraError


def serve(model: str | None = None, *, config=None, **options) -> int:
    """Build the server and run it until SIGINT/SIGTERM (which drain: in-flight requests finish first).
    Options are `ortlora.serve.config.ServeConfig`'s fields (or pass `config=`). With `replicas` (N or MIN:MAX) or
    `ray_address` the same API runs on Ray Serve over engine replicas (ortlora.serve.ray)."""
    from ortlora.serve.config import ServeConfig

    if config is None:
        config = ServeConfig(model=model, **options)
    try:
        import uvicorn

        from ortlora.serve.app import create_app
    except ModuleNotFoundError as exc:
        raise OrtloraError(f"serve needs the serve extra ({exc.name} is missing): pip install ortlora[serve]") from None
    from ortlora.serve.local import LocalEngine
    from ortlora.serve.tenants import Tenants

    if config.tenants is None and not config.insecure_no_auth and not _loopback(config.host):
        raise OrtloraError(f"refusing to serve on {config.host} without --tenants: any caller could use and manage "
                           "adapters (use --tenants tenants.toml, or --insecure-no-auth if that is intended)")
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.ray:
        from ortlora.serve.ray import serve_ray  # ray is imported only here

        return serve_ray(config)
    tenants = Tenants.load(config.tenants) if config.tenants else None  # a bad file: refused before loading
    engine = LocalEngine(config)
    log = logging.getLogger("ortlora.serve")
    directory = engine.adapters.directory
    for skipped in directory.skipped if directory else getattr(engine.registry.source, "skipped", ()):
        log.warning("adapter skipped: %s", skipped)
    for removed in directory.removed if directory else ():
        log.warning("removed %s: left by an interrupted upload", removed.name)
    log.info("model %s (%s), %d adapters registered, batch %d, context %d", engine.limits.model_name, config.model,
             len(engine.adapters.names()), config.max_batch, engine.limits.context_length)
    from ortlora.serve import connections

    app = create_app(engine, config, tenants)
    engine.start()  # here, not in the app's start-up: a model that cannot run is a one-line error (ModelError)
    limits = connections.ConnectionLimits(header_timeout=config.header_timeout, body_timeout=config.body_timeout,
                                          body_min_rate=config.body_min_rate,
                                          max_connections=connections.fit_descriptors(config.max_connections))
    uconfig = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                             timeout_graceful_shutdown=120, access_log=config.log_level == "debug",
                             timeout_keep_alive=config.keep_alive_timeout,
                             http=connections.protocol_class(connections.Guard(limits)))
    # uvicorn re-raises the signal that stopped it once it has drained; after a clean drain SIGTERM exits 0
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        _DrainingServer(uconfig, engine).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


class _DrainingServer:
    """uvicorn's server, plus: on SIGTERM/SIGINT the engine refuses new work at once (503) while uvicorn closes
    the listening socket and waits for in-flight responses."""

    def __new__(cls, config, engine):
        import uvicorn

        class Draining(uvicorn.Server):
            def handle_exit(self, sig, frame):
                engine.drain()
                super().handle_exit(sig, frame)

        return Draining(config)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
