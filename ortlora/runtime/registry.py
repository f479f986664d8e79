"""`AdapterRegistry`: adapter names -> where each adapter is. Names and sources only; what is loaded, held and
evicted is `ortlora.runtime.adapters.Adapters`' business (as sglang's LoRARegistry stands apart from its memory pool).

    AdapterRegistry("adapters/" | "s3://bucket/prefix/" | "https://host/index.toml", cache=..., allow_urls=...)
      names()          every name: the source's listing (kept in memory: a folder is scanned again only when its
                       modification time changes, a remote listing when older than its refresh interval) with the
                       registrations over it; no file I/O per name
      name in reg      a dict lookup (a folder also finds a file dropped in since its last scan)
      locate(name)     -> Located (ortlora.runtime.sources): the adapter on local disk and its content version,
                       downloaded into the bounded cache first when it is remote
      origin(name)     -> Origin: how the name is registered, replayable by another process (Ray replicas)
      info(name)       what a listing shows: the path in the adapters folder or the URL (no credentials)

Registrations shadow the source's names: a file inside the adapters folder (`add_path`, `upload`), any local file
(`add_file`: the Python API), a URL (`add_url`). The model check of a new registration is the caller's
(`Adapters`); the registry only names and places. A URL registration from the HTTP API must lie under a prefix the
operator allowed (`allow_urls`, `--allow-adapter-urls`): without one, a client could make the server fetch from
any address it can reach (SSRF); such fetches follow no HTTP redirects.
"""

from __future__ import annotations

import posixpath
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Sequence
from urllib.parse import unquote, urlsplit

from ortlora.errors import AdapterError, AdapterExists, AdapterInvalid, AdapterNotFound
from ortlora.runtime.adapter_dir import AdapterDirectory, check_name
from ortlora.runtime.sources import (AdapterCache, AdapterSource, Backends, DirectorySource, Located, RemoteAdapter,
                                     is_url, local_version, open_source, safe_url)
from ortlora.runtime.sources.base import REFRESH_S
from ortlora.runtime.sources.cache import MAX_BYTES, REVALIDATE_S

MAX_CACHE_SLOTS = 256
_NO_REDIRECTS = {"allow_redirects": False}


@dataclass(frozen=True)
class Origin:
    """How a name is registered, in terms another process can replay (the Ray ingress sends it with each request)."""
    kind: str  # "source": found by the registry's source; "path": a file in the adapters folder; "url"; "file"
    where: str = ""  # "path": relative to the adapters folder; "url": the URL; "file": an absolute local path;
    # "source": the URL a remote source lists it at (so that a process whose listing is older finds it too)


@dataclass(frozen=True)
class Entry:
    """What a listing shows of a name (never a server path outside the adapters folder, never a credential)."""
    name: str
    path: str | None = None  # relative to the adapters folder
    url: str | None = None


@dataclass
class _Registration:
    origin: Origin
    source: AdapterSource | None = field(default=None, repr=False)  # "url": its RemoteAdapter, opened on first use


class AdapterRegistry:
    """Thread-safe. `source`: a folder, a URL prefix (s3://, gs://, hf://, file://), an index file (local or URL)
    or one adapter's URL, as `ortlora.runtime.sources.open_source` reads it; None: registrations only. `cache`: the
    AdapterCache of URL sources, or a callable opening it on first need."""

    def __init__(self, source: str | Path | None = None, *, reserved: tuple[str, ...] = (),
                 cache: AdapterCache | Callable[[], AdapterCache] | None = None, backends: Backends | None = None,
                 allow_urls: Sequence[str] = (), refresh_s: float = REFRESH_S):
        self.reserved = set(reserved)
        self.allow_urls = tuple(check_prefix(p) for p in allow_urls)
        self.backends = backends or Backends()
        # a registration's URL comes from a client: its fetches follow no redirect out of the allowed prefix
        options = dict(self.backends.storage_options)
        for protocol in ("http", "https"):
            options[protocol] = {**options.get(protocol, {}), **_NO_REDIRECTS}
        self.registration_backends = Backends(options, self.backends.timeout_s, self.backends.download_s)
        self._cache = cache
        self._lock = threading.Lock()
        self._registered: dict[str, _Registration] = {}
        self._hidden: set[str] = set()  # listed by a remote source, unregistered: not listed again
        self.source: AdapterSource | None = None
        self.directory: AdapterDirectory | None = None
        if source is not None:
            spec = str(source)
            local_dir = not is_url(spec) and Path(spec).is_dir()
            self.source = open_source(spec, None if local_dir else self.cache(), backends=self.backends,
                                      reserved=tuple(reserved), refresh_s=refresh_s)
            if isinstance(self.source, DirectorySource):
                self.directory = self.source.directory

    def cache(self) -> AdapterCache:
        """The cache of URL sources, opened on first need."""
        with self._lock:
            if callable(self._cache) and not isinstance(self._cache, AdapterCache):
                self._cache = self._cache()
            if self._cache is None:
                raise AdapterInvalid("adapters by URL need an adapter cache folder (--adapter-cache DIR)")
            return self._cache

    def opened_cache(self) -> AdapterCache | None:
        """The cache, if it was opened (nothing fetched by URL yet: None)."""
        cache = self._cache
        return cache if isinstance(cache, AdapterCache) else None

    def close(self) -> None:
        """Let another process open the cache folder."""
        with self._lock:
            if isinstance(self._cache, AdapterCache):
                self._cache.close()

    # -- looking up ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every registered name, sorted."""
        listed = self.source.names() if self.source is not None else []
        with self._lock:
            if not self._registered and not self._hidden:
                return listed
            return sorted((set(listed) - self._hidden) | set(self._registered))

    def __contains__(self, name: str) -> bool:
        with self._lock:
            if name in self._registered:
                return True
            if name in self._hidden:
                return False
        return self.source is not None and name not in self.reserved and name in self.source

    def __len__(self) -> int:
        return len(self.names())

    def locate(self, name: str) -> Located:
        """`name`'s adapter on local disk (see `ortlora.runtime.sources`); AdapterNotFound, AdapterUnavailable (the
        source did not answer) or AdapterInvalid (not an adapter, too large)."""
        with self._lock:
            reg = self._registered.get(name)
            hidden = name in self._hidden
        if reg is not None:
            if reg.origin.kind == "file":
                path = Path(reg.origin.where)
                return Located(name, path, local_version(path))
            return self._remote(name, reg).locate(name)
        if hidden or self.source is None or name in self.reserved:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        return self.source.locate(name)

    def _remote(self, name: str, reg: _Registration) -> AdapterSource:
        with self._lock:
            source = reg.source
        if source is None:  # an operator's source may redirect (presigned URLs); a client's URL may not
            backends = self.backends if reg.origin.kind == "source" else self.registration_backends
            source = RemoteAdapter(name, reg.origin.where, self.cache(), backends)
            with self._lock:
                reg.source = reg.source or source
                source = reg.source
        return source

    def origin(self, name: str) -> Origin:
        """How `name` is registered (no file I/O); AdapterNotFound when it is not."""
        with self._lock:
            reg = self._registered.get(name)
        if reg is not None:
            return reg.origin
        entry = self.directory.entry(name) if self.directory is not None else None
        if entry is None and name not in self:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        if self.directory is not None:
            return Origin("path", entry[0]) if entry is not None and entry[1] else Origin("source")
        target = getattr(self.source, "target_of", lambda n: None)(name)
        return Origin("source", target.url if target is not None else "")

    def info(self, name: str) -> Entry:
        """What a listing shows of `name` (no file I/O for a listed name)."""
        with self._lock:
            reg = self._registered.get(name)
        if reg is not None:
            return Entry(name, url=safe_url(reg.origin.where) if reg.origin.kind in ("url", "source") else None)
        entry = self.directory.entry(name) if self.directory is not None else None
        if entry is not None:
            return Entry(name, path=entry[0])
        if name not in self:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        if self.directory is not None:  # dropped in since the last scan: placed now
            return Entry(name, path=self.directory.relative(self.directory.path(name)))
        target = getattr(self.source, "target_of", lambda n: None)(name)
        return Entry(name, url=target.label if target is not None else None)

    def label(self, name: str) -> str | None:
        """How messages name the adapter's file: a file registered by path (the Python API's caller knows it); None
        for the rest, named by the adapter's name so that no server path reaches a client."""
        with self._lock:
            reg = self._registered.get(name)
        return reg.origin.where if reg is not None and reg.origin.kind == "file" else None

    def refresh(self) -> None:
        """List the source again now."""
        if self.source is not None:
            self.source.refresh()

    # -- registering ---------------------------------------------------------------------------------------------
    def claim(self, name: str) -> None:
        """Raise unless `name` is free to register: valid, not reserved, not taken."""
        check_name(name)
        if name in self.reserved:
            raise AdapterExists(f"{name!r} is the base model's name")
        if name in self:
            raise AdapterExists(f"adapter {name!r} already exists (DELETE it first)")

    def resolve_path(self, path: str) -> Path:
        """A caller's path inside the adapters folder as a checked file (or PEFT folder)."""
        return self.need_directory().resolve(path)

    def need_directory(self) -> AdapterDirectory:
        if self.directory is None:
            raise AdapterInvalid("there is no adapters directory (start the server with --adapters DIR)")
        return self.directory

    def add_path(self, name: str, real: Path) -> None:
        """Register checked file `real` (inside the adapters folder) as `name`."""
        self.need_directory().add(name, real)
        with self._lock:
            self._hidden.discard(name)

    def add_file(self, name: str, path: Path) -> None:
        """Register local file `path` (anywhere: the Python API) as `name`, replacing any registration of it."""
        self._set(name, _Registration(Origin("file", str(path))))

    def add_url(self, name: str, url: str, source: AdapterSource | None = None) -> None:
        """Register `url` as `name` (`source`: the RemoteAdapter that checked it, kept for its first use)."""
        self._set(name, _Registration(Origin("url", url), source))

    def url_source(self, name: str, url: str) -> AdapterSource:
        """The source of a registration of `url` as `name`, before it is registered (to check it first)."""
        if not is_url(url):
            raise AdapterInvalid(f"adapter {name!r}: {safe_url(url)} is not a URL (http, https, s3, gs, hf, file)")
        return RemoteAdapter(check_name(name), url, self.cache(), self.registration_backends)

    def check_allowed(self, url: str) -> None:
        """AdapterInvalid unless `url` lies under a prefix the operator allowed (see the module docstring)."""
        if not self.allow_urls:
            raise AdapterInvalid("this server does not register adapters by URL (its operator allows URL prefixes "
                                 "with --allow-adapter-urls)")
        if not any(url_under(url, p) for p in self.allow_urls):
            raise AdapterInvalid(f"{safe_url(url)} is not under a URL prefix this server allows "
                                 "(--allow-adapter-urls)")

    def upload(self, name: str, stream: BinaryIO, max_bytes: int, check: Callable[[Path], None]) -> Path:
        """Write an uploaded `.onnx_adapter` into the adapters folder as `name` (see AdapterDirectory.upload)."""
        self.claim(name)
        path = self.need_directory().upload(name, stream, max_bytes, check)
        with self._lock:
            self._hidden.discard(name)
        return path

    def _set(self, name: str, reg: _Registration) -> None:
        with self._lock:
            self._registered[name] = reg
            self._hidden.discard(name)

    def adopt(self, name: str, origin: Origin) -> None:
        """Register `name` as another process's registry has it (no check here: it is checked when it loads)."""
        if origin.kind == "source":
            with self._lock:
                self._registered.pop(name, None)
                self._hidden.discard(name)
            if origin.where and not (self.source is not None and name in self.source):
                self._set(name, _Registration(origin))  # not in this process's listing yet: by its URL
        elif origin.kind == "path":
            directory = self.need_directory()
            real = directory.resolve(origin.where)
            with self._lock:
                self._registered.pop(name, None)
            self.add_path(name, real)
        elif origin.kind in ("url", "file"):
            self._set(name, _Registration(origin))
        else:
            raise AdapterError(f"unknown adapter origin {origin.kind!r}")

    def remove(self, name: str) -> Origin:
        """Unregister `name` (a file uploaded through `upload` is deleted); returns how it was registered."""
        with self._lock:
            reg = self._registered.pop(name, None)
        if reg is not None:
            return reg.origin
        origin = self.origin(name)  # AdapterNotFound
        if self.directory is not None:
            self.directory.remove(name)
        else:
            with self._lock:
                self._hidden.add(name)
        return origin


# -- URL prefixes an operator allows ------------------------------------------------------------------------------
def check_prefix(prefix: str) -> str:
    """`prefix` if it can be an allowed URL prefix: a URL with a host (bucket, organisation) and no query."""
    parts = urlsplit(prefix)
    if not is_url(prefix) or (not parts.netloc and parts.scheme != "file") or parts.query or parts.fragment \
            or parts.username or parts.password:
        raise AdapterError(f"--allow-adapter-urls {safe_url(prefix)!r}: give a URL prefix such as "
                           "https://host/adapters/ or s3://bucket/prefix/ (no credentials, no query string)")
    return prefix


def url_under(url: str, prefix: str) -> bool:
    """Whether `url` lies under `prefix`: the same scheme, host and port, and a path inside the prefix's path
    after '.' and '..' are resolved (compared on the parsed URL, so that `https://allowed@evil/` does not pass)."""
    u, p = urlsplit(url), urlsplit(prefix)
    try:
        same_host = (u.scheme.lower(), u.hostname, _port(u)) == (p.scheme.lower(), p.hostname, _port(p))
    except ValueError:  # a port that is not a number
        return False
    if not same_host or u.username or u.password or "\\" in url:
        return False
    path = unquote(u.path)
    if any(part in (".", "..") for part in path.split("/")):
        return False
    path, root = posixpath.normpath("/" + path), posixpath.normpath("/" + unquote(p.path))
    return path == root or path.startswith(root.rstrip("/") + "/")


def _port(parts) -> int | None:
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())


# -- cache folders --------------------------------------------------------------------------------------------------
def open_cache(root: str | Path, *, max_bytes: int = MAX_BYTES, revalidate_s: float = REVALIDATE_S) -> AdapterCache:
    """The adapter cache of this process under `root`: the first of root/0, root/1, ... that no other process
    holds (a cache folder is one process's), so that a restarted server, or each Ray replica, finds its copies."""
    root = Path(root).expanduser()
    for slot in range(MAX_CACHE_SLOTS):
        folder = root / str(slot)
        try:
            return AdapterCache(folder, max_bytes=max_bytes, revalidate_s=revalidate_s)
        except AdapterError:  # held by another process
            continue
    raise AdapterError(f"adapter cache {root}: all {MAX_CACHE_SLOTS} folders are in use by other processes")


def default_cache_root() -> Path:
    """$XDG_CACHE_HOME/ortlora/adapters (default ~/.cache/ortlora/adapters)."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ortlora" / "adapters"
