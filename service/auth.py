"""Who may do what: the request's principal, the admin check, adapter scopes, rate limits, audit lines.

- **Keys** (service/keys.py, service/keyring.py): ``COGALORA_API_KEY``, ``COGALORA_ADMIN_KEY`` and the entries of
  ``COGALORA_KEY_FILE``. Classification and catalogue routes need one of them once an API key or a
  key file is set; otherwise they are open, and a request without a key is ``anonymous`` (every
  adapter, no rate limit).
- **Admin**: every route that changes what is served declares ``dependencies=[AdminOnly]``, the one
  admin check: 403 while no admin key exists at all, 401 without a valid key, 403 for a key that is
  not an admin's. Each call to such a route, allowed or refused, gives one audit line (who, what,
  target, outcome; never a key) on the ``cogalora.audit`` logger.
- **Scopes**: a key sees and uses only the adapters its patterns match (:class:`ScopedCatalogue`);
  any other adapter gets the very answer a missing one gets (404 ``unknown_adapter``, same message).
- **Rates**: per key id, a request token at the edge and one row token per input before queueing
  (service/ratelimit.py); 429 ``rate_limited`` with ``Retry-After``. The batcher shares its queue
  and its batches fairly between key ids (service/batcher.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from fastapi import Depends, Request

from service.errors import AdapterRequiredError, ForbiddenError, UnauthorizedError, UnknownAdapterError
from service.keyring import KeyRing
from service.keys import ANONYMOUS, Principal
from service.logs import AUDIT_LOGGER
from service.metrics import ServiceMetrics
from service.ratelimit import RateLimiter
from service.settings import Settings
from service.types import AdapterDescription

if TYPE_CHECKING:
    from service.lifecycle import Repository

audit_log = logging.getLogger(AUDIT_LOGGER)
T = TypeVar("T")


class Access:
    """The keys, the rate limiter and the catalogue policy of one app (``app.state.access``)."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self.limiter = RateLimiter(lambda key_id, limit: metrics.key_rate_limited.labels(key_id, limit).inc())
        self.keys = KeyRing(
            settings.api_key_value(), settings.admin_key_value(), settings.key_file, on_reload=self._reloaded
        )
        self.catalogue_admin_only = settings.catalogue_access == "admin"

    def authenticate(self, key: str | None, key_needed: bool) -> Principal:
        """The principal of ``key``; ``anonymous`` without a valid one, unless ``key_needed`` and keys are on."""
        self.keys.refresh()  # every request, so a changed key file is noticed whichever route is called
        principal = self.keys.identify(key) if key else None
        if principal is not None:
            return principal
        if key_needed and self.keys.requires_key:
            raise UnauthorizedError("missing or invalid API key")
        return ANONYMOUS

    def admit_request(self, principal: Principal) -> None:
        """One request of ``principal`` against its request rate (RateLimitedError: 429)."""
        self.limiter.admit_request(principal.key_id, principal.limits)

    def admit_rows(self, principal: Principal, rows: int) -> None:
        """``rows`` inputs of ``principal`` against its row rate (RateLimitedError: 429)."""
        self.limiter.admit_rows(principal.key_id, principal.limits, rows)

    def reload_keys(self) -> None:
        """Re-read the key file now (SIGHUP)."""
        self.keys.reload()

    def _reloaded(self, ok: bool) -> None:
        self.metrics.key_file_reloads.labels("ok" if ok else "invalid").inc()
        if ok:  # the buckets of removed keys go with them
            self.limiter.forget_except({principal.key_id for principal in self.keys.principals()})


# ---- per request ------------------------------------------------------------------------------------


def access_of(request: Request) -> Access:
    return request.app.state.access


def principal_of(request: Request) -> Principal:
    """Who sent ``request`` (set by the edge middleware before routing)."""
    return request.scope["state"]["cogalora"].get("principal", ANONYMOUS)


@dataclass(frozen=True)
class AuditRecord:
    """One admin action, logged with its outcome once the response status is known."""

    who: str
    action: str
    target: str


def require_admin(request: Request) -> Principal:
    """The admin check: the caller must hold an admin key (see the module docstring); marks the audit line."""
    principal = principal_of(request)
    route = request.scope.get("route")
    action = f"{request.method} {getattr(route, 'path', request.url.path)}"
    target = ",".join(f"{name}={_printable(str(value))}" for name, value in request.path_params.items())
    request.scope["state"]["cogalora"]["audit"] = AuditRecord(principal.key_id, action, target)
    if not access_of(request).keys.has_admin():
        raise ForbiddenError(
            "admin routes are closed: no admin key is configured (set COGALORA_ADMIN_KEY, or admin = true "
            "for a key of the key file)"
        )
    if not principal.keyed:
        raise UnauthorizedError("this route needs an admin key")
    if not principal.admin:
        raise ForbiddenError(f"key {principal.key_id!r} may not change what is served; use an admin key")
    return principal


def _printable(value: str, limit: int = 80) -> str:
    """A client-sent value fit for a log line: bounded, one line (not yet validated when it is logged)."""
    shown = "".join(char if char.isprintable() else "?" for char in value[:limit])
    return shown + ("..." if len(value) > limit else "")


def require_catalogue_reader(request: Request) -> Principal:
    """Routes that list adapters: everyone (each sees its own scope), or admin keys only (``catalogue_access``)."""
    principal = principal_of(request)
    if access_of(request).catalogue_admin_only and not principal.admin:
        raise ForbiddenError("listing adapters is open to admin keys only on this server")
    return principal


#: ``dependencies=[AdminOnly]`` on every route that changes what is served.
AdminOnly = Depends(require_admin)
#: ``dependencies=[CatalogueReader]`` on every route that lists adapters.
CatalogueReader = Depends(require_catalogue_reader)


def write_audit_line(record: AuditRecord, status: int, request_id: str) -> None:
    outcome = "allowed" if status < 400 else ("refused" if status in (401, 403) else "failed")
    target = f" {record.target}" if record.target else ""
    audit_log.info(
        "admin %s%s by %s: %s %d",
        record.action,
        target,
        record.who,
        outcome,
        status,
        extra={
            "audit": True,
            "who": record.who,
            "action": record.action,
            "target": record.target,
            "outcome": outcome,
            "status": status,
            "request_id": request_id,
        },
    )


# ---- scopes -------------------------------------------------------------------------------------------


class ScopedCatalogue:
    """The repository as one principal sees it: adapters outside its scope do not exist, and errors name
    only adapters in scope."""

    def __init__(self, repository: Repository, principal: Principal) -> None:
        self.repository = repository
        self.principal = principal

    def names(self) -> list[str]:
        return [name for name in self.repository.names() if self.principal.may_use(name)]

    def resolve(self, requested: str | None) -> str:
        """The adapter a request means: the one named, or the only one in scope (errors as the repository's)."""
        if requested is None:
            visible = self.names()
            if len(visible) == 1:
                return visible[0]
            raise AdapterRequiredError.among(visible)
        return self._in_scope(requested, self.repository.resolve)

    def info(self, name: str) -> AdapterDescription:
        return self._in_scope(name, self.repository.info)

    def adapters(self) -> list[AdapterDescription]:
        return [info for info in self.repository.adapters() if self.principal.may_use(info.name)]

    def loaded_names(self) -> list[str]:
        return [name for name in self.repository.loaded_names() if self.principal.may_use(name)]

    def failures(self) -> dict[str, str]:
        return {name: why for name, why in self.repository.failures.items() if self.principal.may_use(name)}

    def unknown(self, name: str) -> UnknownAdapterError:
        """The answer for an adapter this principal cannot use: the one a missing adapter gets."""
        return UnknownAdapterError.among(name, self.names())

    def _in_scope(self, name: str, read: Callable[[str], T]) -> T:
        if self.principal.may_use(name):
            try:
                return read(name)
            except UnknownAdapterError:
                pass  # the repository's message offers every adapter: answer with the principal's own
        raise self.unknown(name)


def scoped(request: Request, repository: Repository) -> ScopedCatalogue:
    """``repository`` as the sender of ``request`` may see it."""
    return ScopedCatalogue(repository, principal_of(request))
