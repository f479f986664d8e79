import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))
# shared fixtures: the runtime tests' tiny model and adapters, the serve tests' server (module-scoped: each module
# that uses them gets its own)
pytest_plugins = ["runtime_helpers", "serve_helpers"]


class Tiny:
    """Session-wide cache of tiny random checkpoints, PEFT adapters and exports, built on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict = {}

    def _once(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def model(self, arch: str = "llama", **overrides) -> Path:
        """A random HF checkpoint + tokenizer (see ortlora.testing.build_model)."""
        from ortlora.testing import build_model

        key = ("model", arch, tuple(sorted(overrides.items())))
        name = f"{arch}-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
        return self._once(key, lambda: build_model(self.root / "hf" / name, arch, **overrides))

    def adapter(self, model_dir: Path, name: str, **kwargs) -> Path:
        """A random PEFT LoRA adapter for `model_dir` (see ortlora.testing.build_adapter)."""
        from ortlora.testing import build_adapter

        key = ("adapter", str(model_dir), name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        return self._once(key, lambda: build_adapter(model_dir, self.root / "peft" / f"{model_dir.name}-{name}", **kwargs))

    def export(self, model_dir: Path, name: str = "fp32", **kwargs) -> Path:
        """`ortlora.export.export(model_dir, ...)` into a cached folder."""
        from ortlora.export import export

        key = ("export", str(model_dir), name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        out = self.root / "onnx" / f"{model_dir.name}-{name}"
        return self._once(key, lambda: export(model_dir, out, progress=False, **kwargs))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def quickstarted(tmp_path_factory):
    """`ortlora quickstart`'s folder and accuracy table, built once per session (test_quickstart checks the table,
    test_serve_quickstart serves the folders it wrote)."""
    from ortlora.quickstart import quickstart

    work = tmp_path_factory.mktemp("quickstart") / "qs"
    return work, quickstart(work, log=print)


# The suite in layers (`pytest -m unit`, ...): what a module's tests need to run, from cheapest to dearest.
LAYERS = {
    # pure pieces, fakes and in-process objects: no model run
    "unit": {"test_units", "test_planner", "test_serve_units", "test_serve_fields", "test_serve_responses",
             "test_reasoning", "test_adapter_registry", "test_adapter_sources", "test_serve_connections",
             "test_model_folder", "test_olive_flags", "test_hugepages"},
    # tiny models through the real code paths, against references (transformers + PEFT, onnxruntime-genai)
    "scenario": {"test_runtime", "test_runtime_adapters", "test_runtime_packing", "test_runtime_sampling",
                 "test_runtime_structured", "test_engine_scale", "test_adapter_variants", "test_adapter_fuzz",
                 "test_adapters_cached", "test_convert", "test_export", "test_int8", "test_quantize",
                 "test_finetune", "test_olive_commands", "test_generate_cli", "test_cli_errors", "test_quickstart",
                 "test_unified"},
    # real `ortlora serve` processes on 127.0.0.1 with real clients
    "server": {"test_serve", "test_serve_api", "test_serve_budget", "test_serve_clients", "test_serve_quickstart",
               "test_serve_hostile", "test_serve_isolation", "test_serve_adapter_mix", "test_serve_adapter_sources"},
    "browser": {"test_playground"},  # Debian's Chromium, headless
    "ray": {"test_serve_ray"},  # a local Ray instance
}
_LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        layer = _LAYER_OF.get(module)
        if layer is None:
            raise pytest.UsageError(f"{module} is in no test layer: add it to LAYERS in tests/conftest.py")
        item.add_marker(getattr(pytest.mark, layer))
