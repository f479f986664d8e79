"""Which adapters the server knows: names -> `.onnx_adapter` files inside one adapters directory.

Files in `--adapters DIR` are registered by file stem (`acme-support.onnx_adapter` -> `acme-support`) without being
opened, so thousands cost nothing until used; a file dropped into the folder later is found on first use. Loading
(memory-mapped, LRU) is the runtime's AdapterStore's job; this module only names, validates and places files.

Every path that reaches the file system is checked: names are a conservative charset with no separators, and a
path (given to `POST /v1/adapters` or found by discovery) must resolve, symlinks followed, inside the directory.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import BinaryIO, Mapping

from ortlora.adapters.onnx_adapter import SUFFIX, open_onnx_adapter
from ortlora.adapters.validate import LoraInput, check_adapter
from ortlora.errors import AdapterError
from ortlora.fileutil import atomic_file

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20


class AdapterNotFound(AdapterError):
    """No adapter of that name (or one the caller may not see: the message is the same)."""


class AdapterExists(AdapterError):
    """An adapter of that name is already registered."""


class BadAdapterRequest(AdapterError):
    """A name or path that is invalid or points outside the adapters directory, or an unusable upload."""


def check_name(name: object) -> str:
    """`name` if it is a valid adapter name, else BadAdapterRequest saying why."""
    if not isinstance(name, str) or not NAME.match(name) or name.endswith(SUFFIX):
        raise BadAdapterRequest(f"invalid adapter name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                                f"starting with a letter or digit, without the {SUFFIX} suffix")
    return name


class AdapterRegistry:
    """Thread-safe map of adapter names to files inside `root` (None: no directory, nothing to register)."""

    def __init__(self, root: str | Path | None, lora_inputs: Mapping[str, LoraInput] | None = None,
                 reserved: tuple[str, ...] = ()):
        self.root = Path(root).resolve(strict=True) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise AdapterError(f"--adapters {root}: not a folder")
        self.lora_inputs = lora_inputs
        self.reserved = set(reserved)  # e.g. the base model's name
        self._paths: dict[str, Path] = {}
        self._hidden: set[str] = set()  # deleted through the API: not rediscovered from the folder
        self._uploaded: set[str] = set()  # written by add_upload: deleted with the registration
        self._added: set[str] = set()  # registered through the API (kept by refresh)
        self._checked: dict[str, dict] = {}  # name -> the parameters its registration checked, until taken
        self._lock = threading.Lock()
        self.skipped: list[str] = []
        if self.root is not None:
            self._discover()

    def _discover(self) -> None:
        found, skipped = {}, []
        with os.scandir(self.root) as it:
            for entry in it:
                if not entry.name.endswith(SUFFIX):
                    continue
                name = entry.name[: -len(SUFFIX)]
                try:
                    check_name(name)
                    if name in self.reserved:
                        raise BadAdapterRequest(f"{name!r} is the base model's name")
                    found[name] = self._inside(Path(entry.path))
                except AdapterError as exc:
                    skipped.append(f"{entry.name}: {exc}")
        self._paths.update(found)
        self.skipped = skipped

    def refresh(self) -> None:
        """Rescan the folder: files added since are registered, files gone are forgotten (names deleted through
        the API stay hidden; names registered through the API under another file are kept)."""
        if self.root is None:
            return
        with self._lock:
            own = {n: p for n, p in self._paths.items() if n in self._added}
            self._paths = {}
            self._discover()
            for name in self._hidden:
                self._paths.pop(name, None)
            self._paths.update(own)

    def _inside(self, path: Path) -> Path:
        """`path` resolved (symlinks followed); BadAdapterRequest unless it is a file inside the root."""
        assert self.root is not None
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise BadAdapterRequest(f"{path.name}: no such file in the adapters directory") from None
        if not real.is_relative_to(self.root):
            raise BadAdapterRequest(f"{path.name}: resolves outside the adapters directory")
        if not real.is_file():
            raise BadAdapterRequest(f"{path.name}: not a regular file")
        return real

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def __contains__(self, name: str) -> bool:
        try:
            self.path(name)
        except AdapterError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, name: str) -> Path:
        """The file of adapter `name`, checked again now (it may have been replaced by a symlink since)."""
        with self._lock:
            path = self._paths.get(name)
            if path is None and self.root is not None and name not in self._hidden and NAME.match(name) \
                    and name not in self.reserved:
                candidate = self.root / f"{name}{SUFFIX}"  # dropped into the folder after start-up
                try:
                    path = self._paths[name] = self._inside(candidate)
                except BadAdapterRequest:
                    pass
            if path is None:
                raise AdapterNotFound(f"adapter {name!r} does not exist")
        try:
            return self._inside(path)
        except BadAdapterRequest:
            raise AdapterNotFound(f"adapter {name!r} does not exist") from None

    def add_path(self, name: str, path: str) -> Path:
        """Register `path` (relative to, or absolute inside, the adapters directory) as `name`."""
        check_name(name)
        root = self._need_root()
        if not isinstance(path, str) or not path or "\x00" in path:
            raise BadAdapterRequest("path must be a non-empty string")
        real = self._inside(root / path)  # an absolute `path` replaces root: still checked to lie inside
        if not real.name.endswith(SUFFIX):
            raise BadAdapterRequest(f"{path}: not an {SUFFIX} file")
        self._check_file(real, name)
        with self._lock:
            self._claim(name)
            self._paths[name] = real
            self._hidden.discard(name)
            self._added.add(name)
        return real

    def add_upload(self, name: str, stream: BinaryIO, max_bytes: int) -> Path:
        """Write an uploaded adapter into the directory as `<name>.onnx_adapter` (atomically, checked first)."""
        check_name(name)
        root = self._need_root()
        target = root / f"{name}{SUFFIX}"
        with self._lock:
            self._claim(name)
            if target.exists() or target.is_symlink():
                raise AdapterExists(f"adapter {name!r} already exists in the adapters directory")
            self._paths[name] = target  # reserve the name while writing
        try:
            with atomic_file(target) as tmp:
                size = 0
                with open(tmp, "wb") as f:
                    while chunk := stream.read(_CHUNK):
                        size += len(chunk)
                        if size > max_bytes:
                            raise BadAdapterRequest(f"upload exceeds the {max_bytes}-byte limit")
                        f.write(chunk)
                self._check_file(tmp, name)
        except BaseException:
            with self._lock:
                self._paths.pop(name, None)
            raise
        with self._lock:
            self._hidden.discard(name)
            self._uploaded.add(name)
            self._added.add(name)
        return target

    def remove(self, name: str) -> Path:
        """Unregister `name`; a file uploaded through the API is deleted, one placed by hand stays (hidden)."""
        path = self.path(name)
        with self._lock:
            self._paths.pop(name, None)
            self._checked.pop(name, None)
            self._hidden.add(name)
            self._added.discard(name)
            if name in self._uploaded:
                self._uploaded.discard(name)
                path.unlink(missing_ok=True)  # open mappings stay valid: in-flight requests finish
        return path

    def _claim(self, name: str) -> None:
        if name in self.reserved:
            raise AdapterExists(f"{name!r} is the base model's name")
        if name in self._paths:
            raise AdapterExists(f"adapter {name!r} already exists (DELETE it first)")

    def _need_root(self) -> Path:
        if self.root is None:
            raise BadAdapterRequest("the server has no adapters directory (start it with --adapters DIR)")
        return self.root

    def _check_file(self, path: Path, name: str) -> None:
        params = open_onnx_adapter(path).params
        if self.lora_inputs is not None:
            check_adapter(params, self.lora_inputs, f"adapter {name!r}", allow_cast=True)
        with self._lock:
            self._checked[name] = params

    def take_checked(self, name: str) -> dict | None:
        """The parameters that registering `name` just parsed and checked (once; None if taken or never), so
        that loading it right after registration does not parse the file again."""
        with self._lock:
            return self._checked.pop(name, None)
