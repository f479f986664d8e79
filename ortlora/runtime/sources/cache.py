"""`AdapterCache`: remote adapters copied onto local disk, bounded in bytes, kept across restarts.

    fetch(target) ── checked less than revalidate_s ago? ──yes──> the cached copy (sizes checked; sha256 once per
          │                                                       process) ──> Located, pinned until released
          │ no
          ▼
    target.probe(): its version (one metadata request) ── the cached version? ──yes──> the cached copy
          │ a new version (or none cached)
          ▼
    room made (least recently used copies nobody holds go) ─> downloaded into a temporary sibling (at most
    max_download_bytes), checked to be an adapter, hashed, renamed into place; index.json rewritten atomically

Layout: `root/index.json` (what survives a restart: source key, version, files with size and sha256, last use),
`root/.lock` (one process per cache folder, held while it is open), `root/entries/<source key>-<version>-<token>`
(an `.onnx_adapter` file, or a folder holding the PEFT folder `<source key>/`, so that its conversions by
adapters/cached.py replace each other). What entries/ holds that the index does not name (a crash between rename
and index write, temporaries) is removed when the cache opens. Concurrent downloads of different sources may pass
the bound until they end; copies held by callers stay until released.

A failure is remembered so that a broken source is not asked again on every request: a source that did not answer
or was not found for `retry_s`, a version that is not an adapter until the source's version changes. A source
that does not answer while a copy of it is cached is served from the copy.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Protocol

from ortlora.errors import AdapterError, AdapterInvalid, AdapterUnavailable
from ortlora.fileutil import atomic_dir, atomic_file, write_json
from ortlora.runtime.sources.base import Located
from ortlora.runtime.sources.fetch import Probe

log = logging.getLogger("ortlora.adapters")
INDEX = "index.json"
FORMAT = 1
MAX_BYTES = 8 << 30
MAX_DOWNLOAD_BYTES = 1 << 30
REVALIDATE_S = 60.0
RETRY_S = 5.0


class Fetchable(Protocol):
    """What the cache needs of a source (`fetch.Target` is one)."""
    name: str  # the adapter's name, for messages
    key: str  # stable id of the source: a file-name-safe hash
    label: str  # the source for messages: no credentials
    suffix: str  # ".onnx_adapter" for a file, "" for a PEFT folder

    def probe(self) -> Probe: ...

    def download(self, dest: Path, probe: Probe, max_bytes: int) -> None: ...


@dataclass
class Entry:
    """One cached version of one source, as index.json holds it."""
    key: str
    label: str
    version: str
    path: str  # its name under entries/
    files: dict[str, list]  # file within the copy ('' for the copy itself) -> [size, sha256 hex]
    used: float  # wall-clock time of the last use: the LRU order survives a restart

    @property
    def nbytes(self) -> int:
        return sum(size for size, _ in self.files.values())


@dataclass
class CacheStats:
    hits: int = 0  # fetches answered by a cached copy
    downloads: int = 0
    downloaded_bytes: int = 0
    evictions: int = 0
    failures: int = 0


@dataclass(frozen=True)
class _Failure:
    error: AdapterError
    until: float  # time.monotonic() until which the source is not asked again
    version: str | None  # a version that is not an adapter: refused again while the source reports it

    def again(self) -> AdapterError:
        return type(self.error)(str(self.error))


class AdapterCache:
    """Thread-safe; one process per folder (a second one opening it gets AdapterError)."""

    def __init__(self, root: str | Path, *, max_bytes: int = MAX_BYTES, max_download_bytes: int = MAX_DOWNLOAD_BYTES,
                 revalidate_s: float = REVALIDATE_S, retry_s: float = RETRY_S):
        self.root = Path(root).absolute()
        self.entries = self.root / "entries"
        self.entries.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_download_bytes = min(max_download_bytes, max_bytes)
        self.revalidate_s, self.retry_s = revalidate_s, retry_s
        self.stats = CacheStats()
        self._lockfile = _hold(self.root / ".lock")
        self._lock = threading.Lock()
        self._busy: dict[str, threading.Lock] = {}  # source key -> held while it is probed or downloaded
        self._current: dict[str, Entry] = {}  # source key -> its cached version
        self._pins: dict[str, int] = {}  # entry path -> holders
        self._doomed: dict[str, int] = {}  # entry path -> bytes: superseded or corrupt, removed when released
        self._checked: dict[str, float] = {}  # source key -> monotonic time its version was last confirmed
        self._verified: set[str] = set()  # entry paths whose sha256 this process checked
        self._failed: dict[str, _Failure] = {}
        self._load()

    # -- the index ---------------------------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            data = json.loads((self.root / INDEX).read_text())
            found = [Entry(**e) for e in data["entries"]] if data.get("format") == FORMAT else []
        except FileNotFoundError:
            found = []
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("adapter cache %s: index.json is unreadable; starting empty", self.root)
            found = []
        for entry in found:
            if _plain_name(entry.path) and _plain_name(entry.key) and self._sizes_ok(entry):
                self._current[entry.key] = entry
        named = {e.path for e in self._current.values()}
        for path in self.entries.iterdir():
            if path.name not in named:
                _remove(path)
        with self._lock:
            self._write_index()

    def _write_index(self) -> None:
        """(lock held)"""
        write_json(self.root / INDEX, {"format": FORMAT, "entries": [asdict(e) for e in self._current.values()]})

    # -- fetching ----------------------------------------------------------------------------------------------
    def fetch(self, target: Fetchable) -> Located:
        """The local copy of `target`'s current version (see the module docstring); AdapterNotFound,
        AdapterUnavailable or AdapterInvalid naming the adapter."""
        with self._busy_with(target.key):
            now = time.monotonic()
            with self._lock:
                failed = self._failed.get(target.key)
                if failed is not None and now < failed.until:
                    raise failed.again()
                entry = self._current.get(target.key)
                fresh = now - self._checked.get(target.key, -math.inf) < self.revalidate_s
            if entry is not None and fresh and (found := self._use(target, entry)):
                return found
            try:
                probe = target.probe()
            except AdapterUnavailable as exc:
                if entry is not None and (found := self._use(target, entry)):
                    log.warning("%s; serving its cached version %s", exc, entry.version)
                    with self._lock:
                        self._checked[target.key] = now
                    return found
                raise self._fail(target, exc, None, self.retry_s) from None
            except AdapterError as exc:  # gone from the source (or a source this process cannot read)
                self._drop(target.key)
                raise self._fail(target, exc, None, self.retry_s) from None
            if failed is not None and failed.version == probe.version:
                raise self._fail(target, failed.again(), probe.version, self.revalidate_s)
            if entry is not None and entry.version == probe.version and (found := self._use(target, entry)):
                with self._lock:
                    self._checked[target.key] = now
                return found
            try:
                return self._download(target, probe, now)
            except AdapterInvalid as exc:
                raise self._fail(target, exc, probe.version, self.revalidate_s) from None
            except AdapterError as exc:
                raise self._fail(target, exc, None, self.retry_s) from None

    def _download(self, target: Fetchable, probe: Probe, now: float) -> Located:
        if probe.size > self.max_download_bytes:
            raise AdapterInvalid(f"adapter {target.name!r}: {target.label} is larger than the "
                                 f"{self.max_download_bytes}-byte download limit ({probe.size} bytes)")
        with self._lock:
            self._make_room(probe.size)
        version = hashlib.sha256(probe.version.encode()).hexdigest()[:12]
        dest = self.entries / f"{target.key}-{version}-{secrets.token_hex(4)}{target.suffix}"
        if target.suffix:
            with atomic_file(dest) as tmp:
                target.download(tmp, probe, self.max_download_bytes)
                files = {"": _digest(tmp)}
        else:
            with atomic_dir(dest) as tmp:
                (folder := tmp / target.key).mkdir()
                target.download(folder, probe, self.max_download_bytes)
                files = {p.name: _digest(p) for p in sorted(folder.iterdir())}
        entry = Entry(target.key, target.label, probe.version, dest.name, files, time.time())
        with self._lock:
            self.stats.downloads += 1
            self.stats.downloaded_bytes += entry.nbytes
            old = self._current.pop(target.key, None)
            if old is not None:
                self._discard(old)
            self._current[target.key] = entry
            self._checked[target.key] = now
            self._failed.pop(target.key, None)
            self._verified.add(entry.path)
            located = self._pin(target, entry)
            self._make_room(0)
            self._write_index()
        return located

    def _use(self, target: Fetchable, entry: Entry) -> Located | None:
        """`entry` pinned and checked (sizes; sha256 once per process), or None when it went or is corrupt."""
        with self._lock:
            if self._current.get(target.key) is not entry:
                return None
            located = self._pin(target, entry)
            entry.used = time.time()
        if self._sizes_ok(entry) and (entry.path in self._verified or self._hashes_ok(entry)):
            with self._lock:
                self.stats.hits += 1
                self._verified.add(entry.path)
                self._write_index()
            return located
        log.warning("adapter %r: the cached copy of %s does not match its index: fetching it again", target.name,
                    target.label)
        with self._lock:
            if self._current.get(target.key) is entry:
                del self._current[target.key]
                self._discard(entry)
                self._write_index()
        located.release()
        return None

    def _pin(self, target: Fetchable, entry: Entry) -> Located:
        """(lock held)"""
        self._pins[entry.path] = self._pins.get(entry.path, 0) + 1
        return Located(target.name, self._path(entry), entry.version, functools.partial(self._release, entry.path))

    def _release(self, path: str) -> None:
        with self._lock:
            left = self._pins[path] - 1
            if left:
                self._pins[path] = left
                return
            del self._pins[path]
            if self._doomed.pop(path, None) is not None:
                _remove(self.entries / path)
            if self._make_room(0):  # over the bound while everything was held
                self._write_index()

    # -- room --------------------------------------------------------------------------------------------------
    def _make_room(self, need: int) -> bool:
        """(lock held) Remove the least recently used copies nobody holds until `need` more bytes fit; True if any
        went. When every copy is held the bound is exceeded until one is released."""
        used = sum(e.nbytes for e in self._current.values()) + sum(self._doomed.values())
        idle = sorted((e for e in self._current.values() if e.path not in self._pins), key=lambda e: e.used)
        evicted = False
        for entry in idle:
            if used + need <= self.max_bytes:
                break
            del self._current[entry.key]
            self._checked.pop(entry.key, None)
            self._verified.discard(entry.path)
            _remove(self.entries / entry.path)
            used -= entry.nbytes
            self.stats.evictions += 1
            evicted = True
        return evicted

    def _discard(self, entry: Entry) -> None:
        """(lock held) A copy no longer current: removed now, or when its last holder releases it."""
        self._verified.discard(entry.path)
        if entry.path in self._pins:
            self._doomed[entry.path] = entry.nbytes
        else:
            _remove(self.entries / entry.path)

    def _drop(self, key: str) -> None:
        with self._lock:
            entry = self._current.pop(key, None)
            if entry is not None:
                self._discard(entry)
                self._write_index()

    def _fail(self, target: Fetchable, exc: AdapterError, version: str | None, ttl: float) -> AdapterError:
        with self._lock:
            self._failed[target.key] = _Failure(exc, time.monotonic() + ttl, version)
            self.stats.failures += 1
        return exc

    # -- checks ------------------------------------------------------------------------------------------------
    def _path(self, entry: Entry) -> Path:
        """The copy: the file, or the PEFT folder inside the entry's folder."""
        return self.entries / entry.path if "" in entry.files else self.entries / entry.path / entry.key

    def _sizes_ok(self, entry: Entry) -> bool:
        for name, (size, _) in entry.files.items():
            path = self._path(entry) / name if name else self._path(entry)
            if not (_plain_name(name) or name == "") or path.is_symlink() or not path.is_file() \
                    or path.stat().st_size != size:
                return False
        return True

    def _hashes_ok(self, entry: Entry) -> bool:
        return all(_digest(self._path(entry) / name if name else self._path(entry))[1] == sha
                   for name, (_, sha) in entry.files.items())

    @contextmanager
    def _busy_with(self, key: str) -> Iterator[None]:
        """One probe or download per source at a time: a second request for it waits and reuses the copy."""
        with self._lock:
            busy = self._busy.setdefault(key, threading.Lock())
        with busy:
            yield

    # -- inspection and life -----------------------------------------------------------------------------------
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._current.values()) + sum(self._doomed.values())

    def versions(self) -> dict[str, str]:
        """Source label -> cached version."""
        with self._lock:
            return {e.label: e.version for e in self._current.values()}

    def close(self) -> None:
        """Let another process open the folder (copies held by callers stay until released)."""
        if self._lockfile is not None:
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)
            self._lockfile.close()
            self._lockfile = None

    def __enter__(self) -> "AdapterCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _hold(path: Path):
    """The cache folder's lock, held for the cache's life (a killed process's lock goes with it)."""
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise AdapterError(f"adapter cache {path.parent} is in use by another process (give each process its own "
                           "cache folder)") from None
    return f


def _digest(path: Path) -> list:
    """[size, sha256 hex] of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return [os.path.getsize(path), h.hexdigest()]


def _plain_name(name: str) -> bool:
    """A name inside entries/ (an index edited by hand cannot point elsewhere)."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
