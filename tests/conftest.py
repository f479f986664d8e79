import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))


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
