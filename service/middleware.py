"""The raw ASGI edge of the service: request ids, API keys and rates, body size limit, access and audit logs,
request metrics.

Plain ASGI rather than Starlette middleware so that a rejected request (bad key, oversized body)
costs no routing, no body parsing and no exception handling, and every request, rejected or not,
gets exactly one access-log line and one request metric.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from fastapi.responses import Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import Access, write_audit_line
from service.errors import PayloadTooLargeError, ServiceError
from service.lifecycle import Service
from service.logs import ACCESS_LOGGER
from service.metrics import UNKNOWN_ADAPTER
from service.responses import service_error_response, short

access_log = logging.getLogger(ACCESS_LOGGER)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
#: Routes that need a key when keys are configured, and count against a key's request rate (probes,
#: server metadata, /metrics and the console's page and files stay open); /info and /console/stats name
#: the adapters like /adapters; /replicas exists under Ray Serve only (service/ray_serve) and names
#: loaded adapters too.
PROTECTED_PREFIXES = ("/classify", "/adapters", "/info", "/models", "/v2/models", "/replicas", "/console/stats")
#: Adapter uploads (``PUT /adapters/{name}``): their body limit is ``max_upload_bytes``, not ``max_body_bytes``.
UPLOAD_PATH = re.compile(r"^/adapters/[^/]+$")
#: Classification calls, whatever the protocol: counted in the request metrics (POST only).
COUNTED_PATHS = re.compile(r"^/(classify|models/[^/]+(/predict)?|v2/models/[^/]+/infer)$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _is_protected(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PROTECTED_PREFIXES)


def _is_upload(scope: Scope) -> bool:
    return scope.get("method") == "PUT" and UPLOAD_PATH.match(scope.get("path", "")) is not None


def _unread_upload(scope: Scope, info: dict[str, Any]) -> bool:
    """An upload from a caller who is no admin: its route's admin check refuses it before reading the body,
    so the edge does not buffer up to ``max_upload_bytes`` of it either."""
    principal = info.get("principal")
    return _is_upload(scope) and not (principal is not None and principal.admin)


def _offered_key(scope: Scope) -> str | None:
    """``Authorization: Bearer <key>``, else ``X-API-Key: <key>``."""
    authorization = _header(scope, b"authorization")
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return _header(scope, b"x-api-key")


class EdgeMiddleware:
    """Everything that must happen before (and around) routing, as plain ASGI."""

    def __init__(self, app: ASGIApp, service: Service, access: Access) -> None:
        self.app = app
        self.service = service
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        offered_id = _header(scope, b"x-request-id")
        request_id = offered_id if offered_id and _REQUEST_ID.match(offered_id) else uuid.uuid4().hex
        info: dict[str, Any] = {"request_id": request_id}
        scope.setdefault("state", {})["cogalora"] = info
        status = 500
        path, method = scope.get("path", ""), scope.get("method", "")
        counted = method == "POST" and COUNTED_PATHS.match(path) is not None
        shown_path = short(path, 200)  # client-controlled: bounded in the log

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)

        if counted:
            self.service.metrics.inflight.inc()
        try:
            rejection = self._admit(scope, info)
            if rejection is None and not _unread_upload(scope, info):
                receive, rejection = await self._buffer_body(scope, receive)
            if rejection is not None:
                await rejection(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            adapter = info.get("adapter", UNKNOWN_ADAPTER)
            if counted:
                self.service.metrics.inflight.dec()
                self.service.metrics.observe_request(adapter, status, elapsed)
            principal = info.get("principal")
            if principal is not None and principal.keyed and _is_protected(path):
                self.service.metrics.key_requests.labels(principal.key_id, str(status)).inc()
            if "audit" in info:
                write_audit_line(info["audit"], status, request_id)
            access_log.info(
                "%s %s %s",
                method,
                shown_path,
                status,
                extra={
                    "request_id": request_id,
                    "method": method,
                    "path": shown_path,
                    "status": status,
                    "adapter": info.get("adapter"),
                    "inputs": info.get("inputs"),
                    "latency_ms": round(elapsed * 1000, 3),
                },
            )

    def _admit(self, scope: Scope, info: dict[str, Any]) -> Response | None:
        """Who sent the request (``info["principal"]``); a 401 or 429 response when it may not go on."""
        protected = _is_protected(scope.get("path", ""))
        try:
            principal = self.access.authenticate(_offered_key(scope), key_needed=protected)
            info["principal"] = principal
            if protected:
                self.access.admit_request(principal)
        except ServiceError as exc:
            return service_error_response(exc)
        return None

    async def _buffer_body(self, scope: Scope, receive: Receive) -> tuple[Receive, Response | None]:
        """Read the whole body up to the limit (Content-Length first, then the streamed size)."""
        settings = self.service.settings
        limit = settings.max_upload_bytes if _is_upload(scope) else settings.max_body_bytes
        too_large = service_error_response(PayloadTooLargeError(f"request body exceeds {limit} bytes"))
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            return receive, too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([], message, receive), None  # client went away; let the app see it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return receive, too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay(chunks, None, receive), None


def _replay(chunks: list[bytes], pending: Message | None, receive: Receive) -> Receive:
    """A receive callable that first yields the buffered body, then defers to the real one."""
    queue: list[Message] = [pending] if pending else [{"type": "http.request", "body": b"".join(chunks)}]

    async def replay() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replay
