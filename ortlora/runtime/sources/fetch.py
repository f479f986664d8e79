"""One adapter at one URL, read through fsspec: its version (one metadata request per file), its download (bounded,
checked to be an adapter), and every backend failure turned into a typed error that names the adapter and the URL
without credentials or query string.

    Target("acme", "s3://bucket/adapters/acme.onnx_adapter")  # a file
    Target("acme", "hf://org/acme-lora", peft=True)           # a PEFT folder: adapter_config.json + safetensors

fsspec's backends are optional packages (`Backends.filesystem` names the one to install); a remote PEFT folder must
hold `adapter_model.safetensors` (a `.bin` is a pickle: never fetched).
"""

from __future__ import annotations

import hashlib
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

from ortlora.adapters.onnx_adapter import SUFFIX, open_onnx_adapter
from ortlora.adapters.peft import read_lora
from ortlora.errors import AdapterError, AdapterInvalid, AdapterNotFound, AdapterUnavailable

TIMEOUT_S = 30.0  # connect and per-read timeout of every request
DOWNLOAD_S = 600.0  # the longest one download may take (a server trickling bytes never trips a read timeout)
_CHUNK = 1 << 20
PEFT_REMOTE_FILES = ("adapter_config.json", "adapter_model.safetensors")
# URL scheme -> fsspec protocol; fsspec protocol -> (pip package, ortlora extra) that provides it
SCHEMES = {"http": "http", "https": "https", "s3": "s3", "gs": "gs", "gcs": "gs", "hf": "hf", "file": "file"}
_PACKAGES = {"http": ("aiohttp", "http"), "https": ("aiohttp", "http"), "s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"),
             "hf": ("huggingface_hub", "hf")}
# what identifies a file's content, strongest first, as each backend reports it (HTTP/S3: ETag, GCS: generation,
# the Hub: the git blob id, HTTP/S3 without ETag: last-modified time, local files: mtime)
_VALIDATORS = ("ETag", "etag", "generation", "blob_id", "Last-Modified", "LastModified", "updated", "mtime")


def is_url(spec: str) -> bool:
    return urlsplit(spec).scheme in SCHEMES and "://" in spec


def safe_url(url: str) -> str:
    """`url` without user name, password, query string or fragment: what messages and listings may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _options(protocol: str, timeout_s: float) -> dict[str, Any]:
    """The timeouts each backend takes (a backend not listed keeps its own)."""
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout_s,
                                                                    sock_read=timeout_s)}}
    if protocol == "s3":
        return {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                  "retries": {"max_attempts": 2}}}
    return {}


class Backends:
    """fsspec filesystems, one per protocol, built on first use with timeouts and the caller's `storage_options`
    ({protocol: {option: value}}, e.g. {"s3": {"endpoint_url": ...}}), never from listing caches: a second look
    at a file asks the store again."""

    def __init__(self, storage_options: Mapping[str, Mapping[str, Any]] | None = None, timeout_s: float = TIMEOUT_S,
                 download_s: float = DOWNLOAD_S):
        self.storage_options = {k: dict(v) for k, v in (storage_options or {}).items()}
        self.timeout_s, self.download_s = timeout_s, download_s
        self._fs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def filesystem(self, url: str) -> tuple[Any, str]:
        """(filesystem, path within it) for `url`; AdapterInvalid naming the package to install when its backend
        is missing."""
        scheme = urlsplit(url).scheme or "file"
        protocol = SCHEMES.get(scheme)
        if protocol is None:
            raise AdapterInvalid(f"{safe_url(url)}: unsupported scheme {scheme!r} (use {', '.join(sorted(SCHEMES))})")
        with self._lock:
            fs = self._fs.get(protocol)
            if fs is None:
                fs = self._fs[protocol] = self._open(protocol)
        return fs, fs._strip_protocol(url)

    def _open(self, protocol: str):
        package, extra = _PACKAGES.get(protocol, (None, None))
        try:
            import fsspec

            cls = fsspec.get_filesystem_class(protocol)
            options = _options(protocol, self.timeout_s) | self.storage_options.get(protocol, {})
        except ImportError:
            need = f"{package} (pip install 'ortlora[{extra}]')" if package else "fsspec (pip install fsspec)"
            raise AdapterInvalid(f"{protocol}:// adapter sources need {need}") from None
        return cls(use_listings_cache=False, skip_instance_cache=True, **options)


@dataclass(frozen=True)
class Probe:
    """A target's current version and its files' sizes as the store reports them (None: not reported)."""
    version: str
    sizes: tuple[int | None, ...]

    @property
    def size(self) -> int:
        return sum(s or 0 for s in self.sizes)


@dataclass(frozen=True)
class Target:
    """Adapter `name` at `url`: one `.onnx_adapter` file, or (peft) a PEFT folder."""
    name: str
    url: str
    peft: bool = False
    backends: Backends = field(default_factory=Backends, compare=False, repr=False)

    @property
    def key(self) -> str:
        """Names this source in the cache (a hash: the URL may hold a token)."""
        return hashlib.sha256(f"{self.url}\0{self.peft}".encode()).hexdigest()[:32]

    @property
    def label(self) -> str:
        return safe_url(self.url)

    @property
    def suffix(self) -> str:
        return "" if self.peft else SUFFIX

    def _files(self) -> tuple[Any, list[tuple[str, str]]]:
        """(filesystem, [(file name in the local copy, remote path)]): '' is the copy itself for a file."""
        fs, path = self.backends.filesystem(self.url)
        if not self.peft:
            return fs, [("", path)]
        if _is_http(self.url):  # the path is the URL: files go before its query string
            parts = urlsplit(path)
            return fs, [(f, urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{f}")))
                        for f in PEFT_REMOTE_FILES]
        return fs, [(f, f"{path.rstrip('/')}/{f}") for f in PEFT_REMOTE_FILES]

    def probe(self) -> Probe:
        """The current version: one metadata request per file."""
        fs, files = self._files()
        infos = []
        with self.errors():
            for _, path in files:
                info = fs.info(path)
                if info.get("type") == "directory":
                    raise FileNotFoundError(path)  # a folder where a file was named
                infos.append(info)
        return Probe(";".join(_version(i) for i in infos), tuple(i.get("size") for i in infos))

    def download(self, dest: Path, probe: Probe, max_bytes: int) -> None:
        """Copy the target into `dest` (the file itself, or a folder to fill), at most `max_bytes` in all, then check
        that it is an adapter: AdapterInvalid (oversized, truncated, not an adapter) or AdapterUnavailable."""
        fs, files = self._files()
        left = max_bytes
        deadline = time.monotonic() + self.backends.download_s
        for (name, path), expected in zip(files, probe.sizes, strict=True):
            out = dest / name if name else dest
            with self.errors(), fs.open(path, "rb", **open_options(self.url)) as src, open(out, "wb") as f:
                got = 0
                while chunk := src.read(min(_CHUNK, left + 1)):
                    got += len(chunk)
                    if got > left:
                        raise AdapterInvalid(f"adapter {self.name!r}: {self.label} is larger than the "
                                             f"{max_bytes}-byte download limit")
                    f.write(chunk)
                    if time.monotonic() > deadline:
                        raise AdapterUnavailable(f"adapter {self.name!r}: {self.label} did not arrive within "
                                                 f"{self.backends.download_s:g} s")
            left -= got
            if expected is not None and got != expected:
                raise AdapterInvalid(f"adapter {self.name!r}: {self.label} is truncated or changed while it was "
                                     f"read ({got} bytes received, {expected} announced)")
        self.check(dest)

    def check(self, local: Path) -> None:
        """AdapterInvalid unless the local copy parses as what it claims to be (the model check comes later, on
        load); the message names the adapter and the URL, never the local path."""
        try:
            if self.peft:
                read_lora(local)
            else:
                open_onnx_adapter(local)  # parsed and bounds checked; its mapping goes with the result
        except AdapterError as exc:
            message = str(exc).replace(str(local), self.label)
            raise AdapterInvalid(f"adapter {self.name!r}: {message}") from None

    def errors(self):
        return errors(f"adapter {self.name!r}", self.label)


@contextmanager
def errors(subject: str, label: str) -> Iterator[None]:
    """Backend exceptions as typed errors, "<subject>: <label> <what happened>"; the backend's own text is never
    repeated (it may quote the full URL, credentials and all)."""
    try:
        yield
    except AdapterError:
        raise
    except Exception as exc:
        kind, why = classify(exc)
        raise kind(f"{subject}: {label} {why}") from None


def classify(exc: BaseException) -> tuple[type[AdapterError], str]:
    """(error type, what happened) for an exception from an fsspec backend (HTTP, S3, GCS, Hub, local)."""
    known = _known(exc)
    if known is not None:
        return known
    if isinstance(exc, FileNotFoundError):
        return AdapterNotFound, "does not exist"
    return AdapterUnavailable, f"could not be read ({type(exc).__name__})"


def _known(exc: BaseException) -> tuple[type[AdapterError], str] | None:
    if isinstance(exc, FileNotFoundError) and exc.__cause__ is not None:
        return _known(exc.__cause__)  # fsspec's HTTP backend reports any failure as not found, from the real one
    status = getattr(exc, "status", None) or getattr(getattr(exc, "response", None), "status_code", None)
    if status in (404, 410):
        return AdapterNotFound, "does not exist"
    if isinstance(exc, PermissionError) or status in (401, 403):
        return AdapterUnavailable, "refused access (check the credentials)"
    if isinstance(status, int):
        return AdapterUnavailable, f"answered HTTP {status}"
    name = type(exc).__name__
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        return AdapterUnavailable, "did not answer in time"
    if isinstance(exc, ConnectionError) or "Connect" in name:
        return AdapterUnavailable, "could not be reached (connection failed)"
    return None


def is_file_url(url: str) -> bool:
    """Whether `url` names an `.onnx_adapter` file (else a PEFT folder); a query string does not count."""
    return urlsplit(url).path.rstrip("/").endswith(SUFFIX)


def open_options(url: str) -> dict[str, Any]:
    """HTTP: one streaming GET (no range requests, which not every server honours); the size is given because
    fsspec's HTTP backend would ask for it with a HEAD first, which a streaming GET does not use."""
    return {"block_size": 0, "size": 1} if _is_http(url) else {}


def _is_http(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https")


def _version(info: Mapping[str, Any]) -> str:
    size = info.get("size")
    for key in _VALIDATORS:
        value = info.get(key)
        if value not in (None, ""):
            return f"{key}={value},size={size}"
    return f"size={size}"  # a store that reports no validator: only a size change is seen

