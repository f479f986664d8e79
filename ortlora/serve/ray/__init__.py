"""`ortlora serve --replicas N`: the same OpenAI API on Ray Serve, scaled out over engine replicas.

    proxy (--host/--port) ──> OrtloraIngress (1 replica: app.py's app; tenants, adapters' registrations)
                                   │ handle.options(multiplexed_model_id=ADAPTER, stream=True).generate
                                   ▼
                              OrtloraEngine (N replicas, or MIN:MAX autoscaled on ongoing requests): each a
                              Server without HTTP (engine thread, mixed-adapter batches, fair queue, its own KV)

Ray Serve's multiplexing routes a request to a replica that already holds its adapter (and keeps an LRU of
`max_loaded_adapters` per replica), so a request's adapter, its KV cache and its batch stay on one replica.

For `serve run`, a Serve config file or KubeRay's RayService, the application builder is
`ortlora.serve.ray:build_app` with the arguments of `AppArgs` (docs/ray.md has an example config).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from ortlora.errors import OrtloraError

APP_NAME = "ortlora"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's processes bind 127.0.0.1 only
INGRESS, ENGINE = "OrtloraIngress", "OrtloraEngine"
log = logging.getLogger("ortlora.serve")


@dataclass(frozen=True)
class AppArgs:
    """The application's arguments (`serve run ortlora.serve.ray:build_app model=... replicas=2`)."""
    model: str
    adapters: str | None = None
    tenants: str | None = None
    replicas: str = "1"  # N, or MIN:MAX for autoscaling on ongoing requests
    threads: int | None = None  # onnxruntime intra-op threads per replica (also its Ray CPUs)
    max_batch: int = 16
    max_loaded_adapters: int = 64  # per replica: multiplexing's max_num_models_per_replica
    max_queue: int = 256
    max_model_len: int | None = None
    model_name: str | None = None
    prefill_chunk: int | None = None
    provider: str | None = None
    max_num_batched_tokens: int | None = None
    max_lora_rank: int = 64

    @classmethod
    def parse(cls, args: dict) -> "AppArgs":
        """From a config file's strings (or typed values); unknown keys and bad numbers named in one error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems = [f"unknown argument {k!r}" for k in args if k not in fields]
        values = {}
        for key, value in args.items():
            if key in fields and value is not None:
                if fields[key].type.startswith("int"):
                    try:
                        value = int(value)
                    except (TypeError, ValueError):
                        problems.append(f"{key} must be an integer, got {value!r}")
                        continue
                    if value < 1:
                        problems.append(f"{key} must be at least 1, got {value}")
                values[key] = value if fields[key].type.startswith("int") else str(value)
        if "model" not in values:
            problems.append("model is required")
        if problems:
            raise OrtloraError("; ".join(problems))
        out = cls(**values)
        out.scaling()  # checked now
        return out

    def scaling(self) -> dict:
        """The engine deployment's replica options: a fixed count, or autoscaling between MIN and MAX."""
        try:
            low, _, high = self.replicas.partition(":")
            low, high = int(low), int(high or low)
        except ValueError:
            raise OrtloraError(f"--replicas must be N or MIN:MAX, got {self.replicas!r}") from None
        if not 1 <= low <= high:
            raise OrtloraError(f"--replicas must be N >= 1 or MIN:MAX with 1 <= MIN <= MAX, got {self.replicas!r}")
        if low == high:
            return {"num_replicas": low}
        return {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                       "target_ongoing_requests": self.max_batch}}


def build_app(args: dict):
    """The Ray Serve application (ingress + engine replicas) for `serve run` / config files / KubeRay."""
    from ray import serve

    from ortlora.serve.ray.ingress import Ingress
    from ortlora.serve.ray.replica import EngineReplica

    a = args if isinstance(args, AppArgs) else AppArgs.parse(args)
    absolute = {k: str(Path(v).resolve()) if v else None for k, v in
                (("model", a.model), ("adapters", a.adapters), ("tenants", a.tenants))}  # replicas' cwd differs
    options = dict(max_batch=a.max_batch, max_queue=a.max_queue, max_model_len=a.max_model_len,
                   model_name=a.model_name, threads=a.threads, prefill_chunk=a.prefill_chunk, provider=a.provider,
                   max_num_batched_tokens=a.max_num_batched_tokens, max_lora_rank=a.max_lora_rank)
    engine = serve.deployment(
        EngineReplica, name=ENGINE, ray_actor_options={"num_cpus": a.threads or 1},
        # the replica's own fair queue holds what waits: Ray keeps routing by adapter instead of spilling over
        max_ongoing_requests=a.max_batch + a.max_queue, health_check_period_s=2, graceful_shutdown_timeout_s=60,
        **a.scaling(),
    ).bind(absolute["model"], absolute["adapters"], a.max_loaded_adapters, options)
    ingress = serve.deployment(Ingress, name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=4096, graceful_shutdown_timeout_s=60)
    return ingress.bind(engine, dict(model=absolute["model"], adapters=absolute["adapters"],
                                     tenants=absolute["tenants"]))


def check(args: AppArgs) -> None:
    """What would make every replica fail to start, refused before Ray starts: the model folder, the adapters
    folder, the tenants file."""
    from ortlora.model_folder import ModelInfo
    from ortlora.runtime.adapter_dir import AdapterDirectory
    from ortlora.serve.tenants import Tenants

    ModelInfo.read(args.model)
    if args.adapters:
        AdapterDirectory(args.adapters)
    if args.tenants:
        Tenants.load(args.tenants)


def serve_ray(args: AppArgs, *, host: str, port: int, ray_address: str | None = None,
              log_level: str = "info") -> int:
    """Start (or join, with `ray_address`) Ray, run the application on host:port until SIGINT/SIGTERM, then take
    it down (replicas drain; on a private instance Serve and Ray stop too)."""
    if not ray_address:
        # Ray's single-machine mode: every Ray process listens on 127.0.0.1 (a node address of 127.0.0.1 alone
        # is swapped for the machine's routable one); read when ray is imported, inherited by its processes
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise OrtloraError("--replicas needs Ray Serve: pip install 'ortlora[ray]'") from None

    check(args)
    app = build_app(args)
    level = getattr(logging, log_level.upper())
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
        log.info("serving on http://%s:%d with %s engine replica(s)", host, port, args.replicas)
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
