"""The console's pages and actions (a Starlette application, plain server-rendered HTML).

Starlette runs on anyio, and so under Trio in the node agent (Hypercorn's Trio worker,
``frlink/http.py``). Pages: the cluster (nodes, the broker, the store), the VMs, one VM
(its record and the actions ``broker/admin.py`` offers: migrate, failover, delete), the
cluster-wide settings, the audit log. Every page needs a login; every POST needs the
session's CSRF token (403 without it); every change is written with an audit entry in the
same transaction (``broker/admin.py``'s ``by``).

What the cluster store does not know is not shown as if it did: a VM's replication health
and lag are the primary's to tell (``frctl replication status`` on it); the recovery
points are on the owner node's disks. The pages say so.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import trio
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import admin
from broker.cluster_view import read_audit, read_cluster, read_console_account
from broker.election import current_holder
from broker.records import (
    PLACEMENT_POLICIES,
    ConsoleAccount,
    Keys,
    NodeState,
    RecordError,
    Settings,
    VMRecord,
)
from broker.store import ClusterStore, StoreError
from frlink.passwords import verify_password

from . import sessions

log = logging.getLogger("frrep.console")

_HERE: Final = Path(__file__).resolve().parent
#: Failed logins from one address within :data:`LOGIN_WINDOW` seconds before it must wait.
LOGIN_FAILURES: Final = 5
LOGIN_WINDOW: Final = 60.0
#: The largest form body read (the settings' authorization entries are the longest).
MAX_FORM: Final = 64 * 1024

_templates = Jinja2Templates(directory=str(_HERE / "templates"))


def rfc3339(t: float) -> str:
    """``t`` (seconds since the epoch) as RFC 3339 in UTC, to the second."""
    if not t:
        return "-"
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def size(n: int) -> str:
    """Bytes for a person (binary units)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


_templates.env.filters["rfc3339"] = rfc3339
_templates.env.filters["size"] = size
_templates.env.filters["tojson_plain"] = json.dumps


@dataclass(frozen=True)
class ReplicaReport:
    """What the node that holds a replica can say of it, from its own storage."""

    ir_state: str  #: the initial replication: not started, in progress, complete
    applied_sequence: int  #: the last batch applied (0: none yet)
    generation: int
    failed_over: bool
    #: ``(sequence, captured at, applied at)``, newest first (times: seconds since the epoch)
    points: list[tuple[int, float, float]]


@dataclass(frozen=True)
class ConsoleSource:
    """What a console serves: a cluster store, its keys, and the node serving it."""

    store: ClusterStore
    keys: Keys
    node: str  #: the node agent serving this console (shown on every page)
    store_url: str  #: shown on the cluster page, without any credentials in it
    #: What this node can say of a replica it owns (``None``: it holds no data of it);
    #: the recovery points live on the owner's disks, not in the store.
    replica: Callable[[VMRecord], Awaitable[ReplicaReport | None]] | None = None


def _safe_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urllib.parse.urlunsplit(parts)


_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Strict-Transport-Security": "max-age=31536000",
}


class _SecurityHeaders:
    """Every response (pages, redirects, static files, errors) gets the security headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, sending)


def _cookie(response: Response, name: str, value: str) -> None:
    response.set_cookie(name, value, httponly=True, secure=True, samesite="strict", path="/")


class _Throttle:
    """Failed logins by client address: past :data:`LOGIN_FAILURES` within
    :data:`LOGIN_WINDOW` seconds, that address waits (a password guessed online is
    then a matter of years, not hours). Per console process, in memory."""

    def __init__(self) -> None:
        self._failures: dict[str, list[float]] = {}

    def wait(self, address: str, now: float) -> float:
        """Seconds ``address`` must still wait before its next try (0: none)."""
        recent = [t for t in self._failures.get(address, []) if now - t < LOGIN_WINDOW]
        if recent:
            self._failures[address] = recent
        else:
            self._failures.pop(address, None)
        if len(recent) < LOGIN_FAILURES:
            return 0.0
        return LOGIN_WINDOW - (now - recent[0])

    def failed(self, address: str, now: float) -> None:
        self._failures.setdefault(address, []).append(now)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


Handler = Callable[[Request, "_Context"], Awaitable[Response]]


@dataclass(frozen=True)
class _Context:
    """A logged-in request's session and what its pages share."""

    source: ConsoleSource
    account: ConsoleAccount
    session: sessions.Session

    @property
    def csrf(self) -> str:
        return sessions.csrf_token(self.account.session_secret, self.session)

    @property
    def who(self) -> str:
        return f"{self.session.user} (console at {self.source.node})"

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        context.update(user=self.session.user, csrf=self.csrf, node=self.source.node)
        return _render(request, name, status, context)


def _render(request: Request, name: str, status: int, context: dict[str, Any]) -> Response:
    return _templates.TemplateResponse(request, name, context, status_code=status)


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form of a POST (parsed here: no multipart parser needed)."""
    body = await request.body()
    if len(body) > MAX_FORM:
        return {}
    pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    return dict(pairs)


def _forbidden(why: str) -> Response:
    return HTMLResponse(
        f"<!doctype html><title>Forbidden</title><h1>403 Forbidden</h1><p>{why}</p>",
        status_code=403,
    )


def console_app(source: ConsoleSource) -> Starlette:
    """The console as an ASGI application over ``source``."""

    throttle = _Throttle()

    async def account() -> ConsoleAccount | None:
        return await read_console_account(source.store, source.keys)

    def guarded(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Login required; a POST needs the session's CSRF token too; the store being
        unreachable is a page that says so, not a traceback."""

        async def endpoint(request: Request) -> Response:
            try:
                acct = await account()
                session = None
                if acct is not None:
                    session = sessions.open_session(
                        acct.session_secret,
                        request.cookies.get(sessions.SESSION_COOKIE),
                        time.time(),
                    )
                if acct is None or session is None:
                    if request.method == "POST":
                        return _forbidden("not logged in")
                    return RedirectResponse("/login", status_code=303)
                ctx = _Context(source, acct, session)
                if request.method == "POST":
                    form = await _form(request)
                    if not sessions.tokens_match(form.get("csrf"), ctx.csrf):
                        return _forbidden("the form's CSRF token is missing or wrong")
                    request.state.form = form
                return await handler(request, ctx)
            except (StoreError, RecordError) as exc:
                log.warning("console: %s", exc)
                return _render(
                    request,
                    "error.html",
                    503,
                    {"message": f"the cluster store cannot be read: {exc}", "node": source.node},
                )

        return endpoint

    # -- login ----------------------------------------------------------------------------

    async def login_page(request: Request, message: str = "", status: int = 200) -> Response:
        token = request.cookies.get(sessions.LOGIN_COOKIE) or sessions.new_login_token()
        try:
            acct = await account()
        except (StoreError, RecordError) as exc:
            message, acct = f"the cluster store cannot be read: {exc}", None
        if acct is None and not message:
            message = (
                "No administrator password is set: run `frctl cluster admin-password` "
                "on a node first."
            )
        response = _render(
            request,
            "login.html",
            status,
            {"csrf": token, "message": message, "node": source.node, "user": None},
        )
        _cookie(response, sessions.LOGIN_COOKIE, token)
        return response

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return await login_page(request)
        try:
            return await log_in(request)
        except (StoreError, RecordError) as exc:
            log.warning("console: %s", exc)
            return await login_page(request, f"the cluster store cannot be read: {exc}", 503)

    async def log_in(request: Request) -> Response:
        form = await _form(request)
        if not sessions.tokens_match(form.get("csrf"), request.cookies.get(sessions.LOGIN_COOKIE)):
            return _forbidden("the form's CSRF token is missing or wrong")
        address = request.client.host if request.client else "?"
        wait = throttle.wait(address, time.monotonic())
        if wait:
            message = f"Too many failed logins from {address}: try again in {wait:.0f} s."
            return await login_page(request, message, 429)
        acct = await account()
        user, password = form.get("user", ""), form.get("password", "")
        ok = acct is not None and user == acct.user
        if acct is not None:
            # Hashed even for a wrong user, so that the time taken does not tell users apart.
            good = await trio.to_thread.run_sync(verify_password, password, acct.password_hash)
            ok = ok and good
        if not ok or acct is None:
            throttle.failed(address, time.monotonic())
            log.warning("console: failed login for %r from %s", user, address)
            return await login_page(request, "Wrong user name or password.", 401)
        throttle.succeeded(address)
        _, cookie = sessions.new_session(acct.session_secret, user, time.time())
        log.info("console: %s logged in", user)
        response = RedirectResponse("/", status_code=303)
        _cookie(response, sessions.SESSION_COOKIE, cookie)
        response.delete_cookie(sessions.LOGIN_COOKIE, path="/")
        return response

    async def logout(request: Request, ctx: _Context) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(sessions.SESSION_COOKIE, path="/")
        return response

    # -- pages ----------------------------------------------------------------------------

    async def cluster(request: Request, ctx: _Context) -> Response:
        view = await read_cluster(source.store, source.keys)
        holder = await current_holder(source.store, source.keys)
        names = sorted({*view.nodes, *view.admin, *(v.owner for v in view.vms.values())})
        nodes = []
        for name in names:
            node = view.nodes.get(name)
            decided = view.admin.get(name)
            nodes.append(
                {
                    "name": name,
                    "state": (node.state if node else NodeState.DOWN).value,
                    "address": f"{node.record.address}:{node.record.port}" if node else "-",
                    "capacity": node.record.capacity_bytes if node else 0,
                    "used": node.record.used_bytes if node else 0,
                    "vms": len(view.owned_by(name)),
                    "broker": holder is not None and holder.holder == name,
                    "labels": decided.labels if decided else {},
                    "applied": node.record.settings_revision if node else None,
                    "draining": bool(decided and decided.draining),
                }
            )
        return ctx.page(
            request,
            "cluster.html",
            nodes=nodes,
            holder=holder,
            store_url=_safe_url(source.store_url),
            revision=view.revision,
            settings_revision=view.settings_revision,
            vm_count=len([v for v in view.vms.values() if not v.deleted]),
        )

    async def node_action(request: Request, ctx: _Context) -> Response:
        name = request.path_params["node"]
        action = request.path_params["action"]
        if action not in ("drain", "undrain"):
            return ctx.page(request, "error.html", 404, message=f"no action {action!r}")
        await admin.set_draining(
            source.store, source.keys, name, draining=action == "drain", by=ctx.who
        )
        return RedirectResponse("/", status_code=303)

    async def vms(request: Request, ctx: _Context) -> Response:
        view = await read_cluster(source.store, source.keys)
        rows = sorted(view.vms.values(), key=lambda v: (v.deleted, v.name, v.vmid))
        return ctx.page(request, "vms.html", vms=rows, up=sorted(view.nodes))

    async def vm_page(
        request: Request, ctx: _Context, message: str = "", error: str = "", status: int = 200
    ) -> Response:
        vmid = request.path_params["vmid"]
        view = await read_cluster(source.store, source.keys)
        vm = view.vms.get(vmid)
        if vm is None:
            return ctx.page(request, "error.html", 404, message=f"the cluster has no VM {vmid}")
        audit = [e for e in await read_audit(source.store, source.keys) if e.target == vmid]
        targets = [
            n for n, v in sorted(view.nodes.items()) if n != vm.owner and v.state is NodeState.UP
        ]
        local = vm.owner == source.node and source.replica is not None
        report = await source.replica(vm) if local and source.replica else None
        return ctx.page(
            request,
            "vm.html",
            status,
            vm=vm,
            record=asdict(vm),
            targets=targets,
            audit=audit,
            message=message,
            error=error,
            local=local,
            report=report,
            now=time.time(),
        )

    async def vm(request: Request, ctx: _Context) -> Response:
        return await vm_page(request, ctx)

    async def vm_action(request: Request, ctx: _Context) -> Response:
        vmid = request.path_params["vmid"]
        form: dict[str, str] = request.state.form
        action = request.path_params["action"]
        try:
            if form.get("confirm") != "yes":
                raise admin.Refused("tick the box to confirm")
            if action == "migrate":
                node = form.get("node", "")
                await admin.request_migration(source.store, source.keys, vmid, node, by=ctx.who)
                done = f"asked to move to {node}: its owner moves it"
            elif action == "failover":
                raw = form.get("point", "").strip()
                try:
                    point = int(raw) if raw else admin.LATEST_POINT
                except ValueError:
                    raise admin.Refused(f"recovery point {raw!r}: expected a number") from None
                await admin.request_failover(
                    source.store, source.keys, vmid, point=point, by=ctx.who
                )
                done = "failover asked of its owner node"
            elif action == "delete":
                await admin.delete_vm(source.store, source.keys, vmid, by=ctx.who)
                done = "deleted: its primary is told so and stops"
            else:
                return ctx.page(request, "error.html", 404, message=f"no action {action!r}")
        except admin.AdminError as exc:
            return await vm_page(request, ctx, error=str(exc), status=400)
        return await vm_page(request, ctx, message=done)

    async def settings_page(
        request: Request,
        ctx: _Context,
        *,
        message: str = "",
        error: str = "",
        status: int = 200,
        entered: dict[str, str] | None = None,
    ) -> Response:
        view = await read_cluster(source.store, source.keys)
        current = _settings_form(view.settings)
        return ctx.page(
            request,
            "settings.html",
            status,
            form=entered or current,
            policies=PLACEMENT_POLICIES,
            revision=view.settings_revision,
            message=message,
            error=error,
        )

    async def settings(request: Request, ctx: _Context) -> Response:
        if request.method == "GET":
            return await settings_page(request, ctx)
        form: dict[str, str] = request.state.form
        current = (await read_cluster(source.store, source.keys)).settings
        try:
            updates = _settings_updates(current, form)
            if not updates:
                return await settings_page(request, ctx, message="Nothing changed.")
            done = await admin.update_settings(source.store, source.keys, updates, by=ctx.who)
        except admin.AdminError as exc:
            entered = {**_settings_form(current), **form}
            entered["recovery_enabled"] = "on" if form.get("recovery_enabled") else ""
            return await settings_page(request, ctx, error=str(exc), status=400, entered=entered)
        changed = (done.old or Settings()).changes(done.new)
        text = "; ".join(
            f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changed.items()
        )
        return await settings_page(
            request, ctx, message=f"Saved (every node applies it within seconds): {text}"
        )

    async def audit(request: Request, ctx: _Context) -> Response:
        entries = await read_audit(source.store, source.keys)
        return ctx.page(request, "audit.html", entries=entries)

    return Starlette(
        routes=[
            Route("/login", login, methods=["GET", "POST"]),
            Route("/logout", guarded(logout), methods=["POST"]),
            Route("/", guarded(cluster)),
            Route("/nodes/{node}/{action}", guarded(node_action), methods=["POST"]),
            Route("/vms", guarded(vms)),
            Route("/vms/{vmid}", guarded(vm)),
            Route("/vms/{vmid}/{action}", guarded(vm_action), methods=["POST"]),
            Route("/settings", guarded(settings), methods=["GET", "POST"]),
            Route("/audit", guarded(audit)),
            Mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static"),
        ],
        middleware=[Middleware(_SecurityHeaders)],
    )


# -- the settings form -------------------------------------------------------------------


def _settings_form(settings: Settings) -> dict[str, str]:
    """The settings as the form's fields show them."""
    return {
        "recovery_enabled": "on" if settings.recovery_enabled else "",
        "auth_type": settings.auth_type,
        "port": str(settings.port),
        "authorization": json.dumps(settings.authorization, indent=2),
        "default_storage": settings.default_storage,
        "placement_policy": str(settings.placement_policy),
        "placement_rules": ", ".join(settings.placement_rules),
        "recovery_points": str(settings.recovery_points),
    }


def _number(text: str) -> Any:
    # A number when it is one; otherwise the text, which the settings' check refuses
    # with the setting's name (as `frctl cluster settings port=abc` is).
    try:
        return int(text.strip())
    except ValueError:
        return text


def _settings_updates(current: Settings, form: dict[str, str]) -> dict[str, Any]:
    """The settings the form changes, as ``broker/admin.py``'s ``{name: value}``: only
    those that differ from ``current``, so that a change made meanwhile by someone else
    to another setting is kept."""
    raw_auth = form.get("authorization", "").strip() or "[]"
    try:
        authorization = json.loads(raw_auth)
    except ValueError as exc:
        raise admin.InvalidSetting(f"authorization: not JSON ({exc})") from None
    entered: dict[str, Any] = {
        "recovery_enabled": bool(form.get("recovery_enabled")),
        "auth_type": form.get("auth_type", current.auth_type),
        "port": _number(form.get("port", str(current.port))),
        "authorization": authorization,
        "default_storage": form.get("default_storage", current.default_storage).strip(),
        "placement_policy": form.get("placement_policy", str(current.placement_policy)),
        "placement_rules": [
            r for r in form.get("placement_rules", "").replace(",", " ").split() if r
        ],
        "recovery_points": _number(form.get("recovery_points", str(current.recovery_points))),
    }
    now = json.loads(current.to_json())
    return {k: v for k, v in entered.items() if now.get(k) != v}
