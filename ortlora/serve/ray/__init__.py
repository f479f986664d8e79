"""`ortlora serve --replicas N`: the same OpenAI API on Ray Serve, scaled out over engine replicas.

    proxy (--host/--port) ──> OrtloraIngress (1 replica: app.py's app; tenants, adapters' registrations)
                                   │ handle.options(multiplexed_model_id=ADAPTER, stream=True).generate
                                   ▼
                              OrtloraEngine (N replicas, or MIN:MAX autoscaled on ongoing requests): each a
                              LocalEngine without HTTP (engine thread, mixed-adapter batches, fair queue, own KV)

Ray Serve's multiplexing routes a request to a replica that already holds its adapter (and keeps an LRU of
`max_loaded_adapters` per replica), so a request's adapter, its KV cache and its batch stay on one replica.

For `serve run`, a Serve config file or KubeRay's RayService, the application builder is
`ortlora.serve.ray:build_app` with `ortlora serve`'s options as arguments (`ServeConfig`'s fields; docs/ray.md has
an example config).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from ortlora.errors import OrtloraError
from ortlora.serve.config import ServeConfig

APP_NAME = "ortlora"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's processes bind 127.0.0.1 only
INGRESS, ENGINE = "OrtloraIngress", "OrtloraEngine"
log = logging.getLogger("ortlora.serve")


def build_app(args: "dict | ServeConfig"):
    """The Ray Serve application (ingress + engine replicas) for `serve run` / config files / KubeRay."""
    from ray import serve

    from ortlora.serve.ray.ingress import Ingress
    from ortlora.serve.ray.replica import EngineReplica

    config = (args if isinstance(args, ServeConfig) else ServeConfig.parse(args)).absolute()  # replicas' cwd differs
    engine = serve.deployment(
        EngineReplica, name=ENGINE, ray_actor_options={"num_cpus": config.threads or 1},
        # the replica's own fair queue holds what waits: Ray keeps routing by adapter instead of spilling over
        max_ongoing_requests=config.max_batch + config.max_queue, health_check_period_s=2,
        graceful_shutdown_timeout_s=60, **config.scaling(),
    ).bind(config)
    ingress = serve.deployment(Ingress, name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=4096, graceful_shutdown_timeout_s=60)
    return ingress.bind(engine, config)


def check(config: ServeConfig) -> None:
    """What would make every replica fail to start, refused before Ray starts: the model folder, a local adapters
    folder or index file, the tenants file (a URL source is listed by the ingress when it starts)."""
    from ortlora.model_folder import ModelInfo
    from ortlora.runtime.sources import is_url
    from ortlora.serve.tenants import Tenants

    ModelInfo.read(config.model)
    if config.adapters and not is_url(config.adapters) and not Path(config.adapters).exists():
        raise OrtloraError(f"adapter source {config.adapters}: no such folder or index file")
    if config.tenants:
        Tenants.load(config.tenants)


def serve_ray(config: ServeConfig) -> int:
    """Start (or join, with `ray_address`) Ray, run the application on host:port until SIGINT/SIGTERM, then take
    it down (replicas drain; on a private instance Serve and Ray stop too)."""
    host, port, ray_address = config.host, config.port, config.ray_address
    if not ray_address:
        # Ray's single-machine mode: every Ray process listens on 127.0.0.1 (a node address of 127.0.0.1 alone
        # is swapped for the machine's routable one); read when ray is imported, inherited by its processes
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise OrtloraError("--replicas needs Ray Serve: pip install 'ortlora[ray]'") from None

    check(config)
    app = build_app(config)
    level = getattr(logging, config.log_level.upper())
    if ray_address:
        ray.init(address=ray_address, logging_level=level)
    else:  # a private local instance, reachable only from this machine
        ray.init(address="local", include_dashboard=False, logging_level=level)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica failed to start: its error is in the message
            raise OrtloraError(f"the Ray Serve application did not start: {exc}") from None
        log.info("serving on http://%s:%d with %s engine replica(s)", host, port, config.replicas or "1")
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            if ray_address:  # a shared cluster: only this application goes (its replicas drain)
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0
