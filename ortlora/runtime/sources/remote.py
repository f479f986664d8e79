"""Adapter sources by URL: one adapter at a URL (`RemoteAdapter`), every adapter under a prefix (`RemotePrefix`:
s3://, gs://, hf://, file://), or the adapters an index file names (`RemoteIndex`: JSON or TOML, any scheme).

    s3://bucket/adapters/            acme.onnx_adapter -> "acme";  support/adapter_config.json -> "support" (PEFT)
    https://host/adapters.toml       [adapters]  acme = "acme.onnx_adapter"   # relative to the index
                                                 support = "s3://bucket/peft/support"  # no suffix: a PEFT folder

Names come from a listing kept in memory (never a request per lookup): taken when the source opens (a failure then
is an error), again when older than `refresh_s` on `names()` or on a lookup of an unknown name; a later listing
that fails keeps the last one. Adapters are fetched into the shared `AdapterCache` on first `locate`.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

from ortlora.adapters.onnx_adapter import SUFFIX
from ortlora.errors import AdapterError, AdapterInvalid, AdapterNotFound
from ortlora.runtime.adapter_dir import check_name
from ortlora.runtime.sources.base import REFRESH_S, Located
from ortlora.runtime.sources.cache import AdapterCache
from ortlora.runtime.sources.fetch import Backends, Target, errors, is_file_url, is_url, open_options, safe_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("ortlora.adapters")
MAX_INDEX_BYTES = 4 << 20
PREFIX_SCHEMES = ("s3", "gs", "gcs", "hf", "file")  # stores that list a prefix in one (paginated) request


class RemoteAdapter:
    """One adapter at one URL (a registration's source): an `.onnx_adapter` file, or a PEFT folder when the URL
    does not end in `.onnx_adapter`."""

    def __init__(self, name: str, url: str, cache: AdapterCache, backends: Backends | None = None):
        self.target = Target(check_name(name), url, not is_file_url(url), backends or Backends())
        self.label = self.target.label
        self.cache = cache

    def names(self) -> list[str]:
        return [self.target.name]

    def __contains__(self, name: str) -> bool:
        return name == self.target.name

    def target_of(self, name: str) -> Target | None:
        return self.target if name == self.target.name else None

    def locate(self, name: str) -> Located:
        if name != self.target.name:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        return self.cache.fetch(self.target)

    def refresh(self) -> None:
        pass


class _Listed:
    """A source whose names come from a listing (see the module docstring); subclasses say how to list."""

    def __init__(self, url: str, cache: AdapterCache, backends: Backends | None, reserved: tuple[str, ...],
                 refresh_s: float):
        self.url, self.label = url, safe_url(url)
        self.cache, self.backends = cache, backends or Backends()
        self.reserved, self.refresh_s = set(reserved), refresh_s
        self.skipped: list[str] = []  # entries refused by the last listing, with why
        self._targets: dict[str, Target] = {}
        self._listed = -float("inf")
        self._listing = threading.Lock()
        self.refresh()

    def _list(self) -> tuple[dict[str, tuple[str, bool]], list[str]]:
        """(name -> (url, peft) as the source holds them now, entries skipped with why)."""
        raise NotImplementedError

    def refresh(self) -> None:
        with self._listing:
            self._take(*self._list())

    def _take(self, found: dict[str, tuple[str, bool]], skipped: list[str]) -> None:
        targets = {}
        for name, (url, peft) in found.items():
            try:
                check_name(name)
                if name in self.reserved:
                    raise AdapterInvalid(f"{name!r} is the base model's name")
            except AdapterError as exc:
                skipped.append(f"{safe_url(url)}: {exc}")
                continue
            targets[name] = Target(name, url, peft, self.backends)
        self._targets, self.skipped, self._listed = targets, skipped, time.monotonic()

    def _refresh_if_stale(self) -> None:
        """List again when the listing is old; one thread lists, the others use the last listing meanwhile."""
        if time.monotonic() - self._listed < self.refresh_s or not self._listing.acquire(blocking=False):
            return
        try:
            self._take(*self._list())
        except AdapterError as exc:
            log.warning("%s (keeping the last listing)", exc)
            self._listed = time.monotonic()  # not asked again on every request
        finally:
            self._listing.release()

    def names(self) -> list[str]:
        self._refresh_if_stale()
        return sorted(self._targets)

    def __contains__(self, name: str) -> bool:
        if name not in self._targets:
            self._refresh_if_stale()
        return name in self._targets

    def target_of(self, name: str) -> Target | None:
        """Where a listed name is (no request)."""
        return self._targets.get(name)

    def locate(self, name: str) -> Located:
        target = self._targets.get(name)
        if target is None:
            self._refresh_if_stale()
            target = self._targets.get(name)
        if target is None:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        return self.cache.fetch(target)


class RemotePrefix(_Listed):
    """Every `<name>.onnx_adapter` and PEFT folder `<name>/` directly under a prefix, listed without downloading:
    one flat listing of the keys under it (paginated by the store), filtered to those two shapes."""

    def __init__(self, url: str, cache: AdapterCache, backends: Backends | None = None, reserved: tuple[str, ...] = (),
                 refresh_s: float = REFRESH_S):
        if url.split("://", 1)[0] not in PREFIX_SCHEMES:
            raise AdapterInvalid(f"{safe_url(url)}: a web server cannot list a folder; name an index file "
                                 "(.json or .toml: name = URL) or register each adapter by its URL")
        super().__init__(url.rstrip("/"), cache, backends, reserved, refresh_s)

    def _list(self) -> tuple[dict[str, tuple[str, bool]], list[str]]:
        fs, root = self.backends.filesystem(self.url)
        root = root.rstrip("/")
        with errors("adapter source", self.label):
            paths = fs.find(root)
        found: dict[str, tuple[str, bool]] = {}
        skipped = []
        for path in sorted(paths):
            parts = path[len(root) + 1:].split("/") if path.startswith(root + "/") else []
            if len(parts) == 1 and parts[0].endswith(SUFFIX):
                name, peft = parts[0][: -len(SUFFIX)], False
            elif len(parts) == 2 and parts[1] == "adapter_config.json":
                name, peft = parts[0], True
            else:
                continue
            if name in found:
                skipped.append(f"{name}: both {name}{SUFFIX} and a PEFT folder {name}/; the file is used")
                continue
            found[name] = (f"{self.url}/{parts[0]}", peft)
        return found, skipped


class RemoteIndex(_Listed):
    """The adapters an index file names: JSON `{"name": "url", ...}` or TOML, optionally under an `adapters` table;
    a relative URL is relative to the index, one ending in `.onnx_adapter` is a file, any other a PEFT folder. The
    index itself may be a URL or a local file."""

    def __init__(self, url: str, cache: AdapterCache, backends: Backends | None = None, reserved: tuple[str, ...] = (),
                 refresh_s: float = REFRESH_S):
        if not is_url(url):
            url = Path(url).absolute().as_posix()
        super().__init__(url, cache, backends, reserved, refresh_s)

    def _list(self) -> tuple[dict[str, tuple[str, bool]], list[str]]:
        fs, path = self.backends.filesystem(self.url)
        with errors("adapter index", self.label), fs.open(path, "rb", **open_options(self.url)) as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
        if len(raw) > MAX_INDEX_BYTES:
            raise AdapterInvalid(f"adapter index {self.label} is larger than {MAX_INDEX_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
            table = tomllib.loads(text) if self.label.endswith(".toml") else json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
            raise AdapterInvalid(f"adapter index {self.label} does not parse: {exc}") from None
        if isinstance(table, dict) and isinstance(table.get("adapters"), dict):
            table = table["adapters"]
        if not isinstance(table, dict):
            raise AdapterInvalid(f"adapter index {self.label} must map adapter names to URLs")
        base = self.url.split("?", 1)[0].rsplit("/", 1)[0]
        found, skipped = {}, []
        for name, value in table.items():
            if not isinstance(value, str) or not value:
                skipped.append(f"{name}: not a URL")
                continue
            url = value if is_url(value) or value.startswith("/") else f"{base}/{value}"
            found[str(name)] = (url, not is_file_url(url))
        return found, skipped
