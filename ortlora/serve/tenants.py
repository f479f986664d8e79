"""API keys -> tenants -> the adapters each may use, from a TOML file; keys are stored only as sha256 hashes.

    # tenants.toml
    [tenants.acme]
    api_key_sha256 = ["5e88...42"]        # `printf %s "$KEY" | sha256sum`; several keys allow rotation
    adapters = ["acme-support", "acme-*"]  # adapter names or shell-style patterns; "*" = every adapter
    base_model = true                      # may it call the base model (default true)
    admin = false                          # may it load, upload and delete adapters and read /metrics (default false)
    share_prefix_cache = false             # may its prompts' cached KV serve other sharing tenants (default false)

    [tenants.ops]                          # the operator of every adapter: an admin whose patterns cover them all
    api_key_sha256 = ["9f86...08"]
    adapters = ["*"]
    admin = true

A request without a valid key gets 401. An adapter a tenant may not use looks exactly like a missing one (same
404, same message), and `/v1/models` lists only what the caller may use. `admin = true` adds management, never
reach: an admin lists, runs, uploads, registers and deletes only names its `adapters` patterns match (another name
is a 404 to use or delete, a 403 to create), and its `/metrics` leaves out every series labelled with an adapter it
may not see. An admin table must say `adapters` (a load error otherwise: an admin that silently sees nothing, or
silently sees everything, is a surprise either way). Without a tenants file every caller is an anonymous admin of
every adapter (the server then binds to 127.0.0.1 by default).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ortlora.errors import OrtloraError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

_HEX64 = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")  # fullmatch: "$" would accept a trailing newline
_TENANT_KEYS = {"api_key_sha256", "adapters", "base_model", "admin", "share_prefix_cache"}


class TenantsError(OrtloraError):
    """The tenants file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: tuple[str, ...] = ("*",)
    base_model: bool = True
    admin: bool = False
    share_prefix_cache: bool = False  # the KV of a prompt reveals it: kept to the tenant unless both sides allow it
    _exact: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def may_use(self, adapter: str) -> bool:
        """May this tenant run requests on, see, and (an admin) manage `adapter`? Its patterns alone say so."""
        if adapter in self._exact:
            return True
        return any(fnmatch.fnmatchcase(adapter, p) for p in self.adapters if p not in self._exact)

    @property
    def sees_all(self) -> bool:
        """Does a pattern match every name (nothing to filter out)?"""
        return "*" in self.adapters


ANONYMOUS = Tenant("anonymous", admin=True)  # adapters ("*",): every adapter


def hash_key(key: str) -> str:
    """The sha256 hex digest under which an API key is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Tenants:
    """Authenticates API keys. `Tenants.open()` (no file) accepts any key, or none, as `ANONYMOUS`."""

    def __init__(self, by_hash: dict[str, Tenant] | None):
        self._by_hash = by_hash

    @classmethod
    def open(cls) -> "Tenants":
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self._by_hash is not None

    def cache_namespace(self, tenant: str) -> tuple[str, ...]:
        """The prefix-cache namespace of `tenant`'s requests: its own, or the one tenants that share use."""
        found = next((t for t in (self._by_hash or {}).values() if t.name == tenant), None)
        return ("shared",) if found is not None and found.share_prefix_cache else ("tenant", tenant)

    @property
    def tenants(self) -> list[Tenant]:
        return sorted({t.name: t for t in (self._by_hash or {}).values()}.values(), key=lambda t: t.name)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of an `Authorization: Bearer KEY` header; None when the key is missing or unknown."""
        if self._by_hash is None:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        # Looked up by the hash of the key: timing can only reveal something about a hash, never the key.
        return self._by_hash.get(hash_key(key))

    @classmethod
    def load(cls, path: str | Path) -> "Tenants":
        """Read a tenants file; one TenantsError lists every problem in it."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TenantsError(f"{path}: no such tenants file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TenantsError(f"{path}: cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise TenantsError(f"{path}: not valid TOML: {exc}") from None
        return cls(_parse(data, str(path)))


def _parse(data: dict, source: str) -> dict[str, Tenant]:
    problems: list[str] = []
    extra = sorted(set(data) - {"tenants"})
    if extra:
        problems.append(f"unknown top-level keys {extra} (only [tenants.NAME] tables are read)")
    tables = data.get("tenants")
    if not isinstance(tables, dict) or not tables:
        problems.append("no [tenants.NAME] tables")
        tables = {}
    by_hash: dict[str, Tenant] = {}
    for name, t in tables.items():
        where = f"tenants.{name}"
        if not isinstance(t, dict):
            problems.append(f"{where} is not a table")
            continue
        unknown = sorted(set(t) - _TENANT_KEYS)
        if unknown:
            problems.append(f"{where}: unknown keys {unknown} (known: {sorted(_TENANT_KEYS)})")
        keys = t.get("api_key_sha256")
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not keys:
            problems.append(f"{where}: api_key_sha256 must list at least one sha256 hex digest")
            keys = []
        adapters = t.get("adapters", [])
        if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
            problems.append(f"{where}: adapters must be a list of names or patterns")
            adapters = []
        if t.get("admin") is True and "adapters" not in t:
            problems.append(f"{where}: admin = true needs an adapters list: the adapters it may manage and use "
                            f'(adapters = ["*"] for every adapter)')
        flags = {}
        for flag, default in (("base_model", True), ("admin", False), ("share_prefix_cache", False)):
            value = t.get(flag, default)
            if not isinstance(value, bool):
                problems.append(f"{where}: {flag} must be true or false, got {value!r}")
                value = default
            flags[flag] = value
        exact = frozenset(a for a in adapters if not any(c in a for c in "*?["))
        tenant = Tenant(name, tuple(adapters), flags["base_model"], flags["admin"], flags["share_prefix_cache"], exact)
        for k in keys:
            m = _HEX64.fullmatch(k) if isinstance(k, str) else None
            if not m:
                problems.append(f"{where}: {k!r} is not a sha256 hex digest (64 hex digits; store hashes, not keys)")
                continue
            digest = m.group(1).lower()
            if digest in by_hash and by_hash[digest].name != name:
                problems.append(f"{where}: a key hash is also listed for tenant {by_hash[digest].name!r}")
            by_hash[digest] = tenant
    if problems:
        raise TenantsError(f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n  "
                           + "\n  ".join(problems))
    return by_hash
