"""The console's frame (a Starlette application, plain server-rendered HTML): what every
console shares, whatever it shows.

Starlette runs on anyio, and so under Trio (Hypercorn's Trio worker, ``frlink/http.py``).
A *source* decides which pages exist (:class:`Source`): a cluster node's
(``frconsole/cluster.py``: the cluster, the VMs of the store, one VM and its actions, the
cluster-wide settings) or a stand-alone recovery server's (``frconsole/standalone.py``:
the replicas it holds, one replica, its configuration). This module gives every one of
them the same login, sessions (``frconsole/sessions.py``), CSRF check, login throttling,
security headers, layout and audit log page. Every page needs a login; every POST needs
the session's CSRF token (403 without it); every change is written with an audit entry in
the same transaction (``broker/admin.py``'s ``by``). The account and the audit log are
records of a :class:`~broker.store.ClusterStore` in both cases: the cluster's store, or
a stand-alone server's own SQLite file.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import trio
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.cluster_view import read_audit, read_console_account
from broker.records import ConsoleAccount, Keys, RecordError
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


#: ``guarded(handler)``: the endpoint of a page that needs a login (and a POST, the CSRF
#: token), as :func:`console_app` gives it to a source's :meth:`Source.routes`.
Guard = Callable[["Handler"], Callable[[Request], Awaitable[Response]]]


class Source(Protocol):
    """What a console serves: where its account and audit log are, and its pages."""

    @property
    def store(self) -> ClusterStore:
        """The store of the console's account and audit log."""
        ...

    @property
    def keys(self) -> Keys: ...

    @property
    def node(self) -> str:
        """The host serving this console (in each audit entry's "who")."""
        ...

    @property
    def served_by(self) -> str:
        """The footer's words: ``node n1.example.com``."""
        ...

    @property
    def store_name(self) -> str:
        """The store in an error message: ``the cluster store``."""
        ...

    @property
    def password_hint(self) -> str:
        """How the administrator's password is set (the login page, before it is)."""
        ...

    @property
    def audit_note(self) -> str:
        """What the audit log holds (its page's first line)."""
        ...

    @property
    def nav(self) -> Sequence[tuple[str, str]]:
        """The menu: ``(path, label)``; ``/audit`` is always there."""
        ...

    def routes(self, guarded: Guard) -> list[BaseRoute]:
        """The source's pages (``/`` among them), each handler wrapped in ``guarded``."""
        ...


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


Handler = Callable[[Request, "Context"], Awaitable[Response]]


@dataclass(frozen=True)
class Context:
    """A logged-in request's session and what its pages share."""

    source: Source
    account: ConsoleAccount
    session: sessions.Session

    @property
    def csrf(self) -> str:
        return sessions.csrf_token(self.account.session_secret, self.session)

    @property
    def who(self) -> str:
        return f"{self.session.user} (console at {self.source.node})"

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        context.update(user=self.session.user, csrf=self.csrf)
        return render(request, self.source, name, status, context)


def render(
    request: Request, source: Source, name: str, status: int, context: dict[str, Any]
) -> Response:
    """The template ``name`` in the console's layout (its menu, its footer)."""
    context.setdefault("user", None)
    context.update(node=source.node, served_by=source.served_by, nav=source.nav)
    return _templates.TemplateResponse(request, name, context, status_code=status)


async def form(request: Request) -> dict[str, str]:
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


def console_app(source: Source) -> Starlette:
    """The console as an ASGI application over ``source`` (its pages, and the login,
    logout and audit log pages every console has)."""

    throttle = _Throttle()

    async def account() -> ConsoleAccount | None:
        return await read_console_account(source.store, source.keys)

    def unreadable(exc: Exception) -> str:
        return f"{source.store_name} cannot be read: {exc}"

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
                ctx = Context(source, acct, session)
                if request.method == "POST":
                    posted = await form(request)
                    if not sessions.tokens_match(posted.get("csrf"), ctx.csrf):
                        return _forbidden("the form's CSRF token is missing or wrong")
                    request.state.form = posted
                return await handler(request, ctx)
            except (StoreError, RecordError) as exc:
                log.warning("console: %s", exc)
                return render(request, source, "error.html", 503, {"message": unreadable(exc)})

        return endpoint

    # -- login ----------------------------------------------------------------------------

    async def login_page(request: Request, message: str = "", status: int = 200) -> Response:
        token = request.cookies.get(sessions.LOGIN_COOKIE) or sessions.new_login_token()
        try:
            acct = await account()
        except (StoreError, RecordError) as exc:
            message, acct = unreadable(exc), None
        if acct is None and not message:
            message = f"No administrator password is set: {source.password_hint}."
        response = render(
            request, source, "login.html", status, {"csrf": token, "message": message}
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
            return await login_page(request, unreadable(exc), 503)

    async def log_in(request: Request) -> Response:
        posted = await form(request)
        if not sessions.tokens_match(
            posted.get("csrf"), request.cookies.get(sessions.LOGIN_COOKIE)
        ):
            return _forbidden("the form's CSRF token is missing or wrong")
        address = request.client.host if request.client else "?"
        wait = throttle.wait(address, time.monotonic())
        if wait:
            message = f"Too many failed logins from {address}: try again in {wait:.0f} s."
            return await login_page(request, message, 429)
        acct = await account()
        user, password = posted.get("user", ""), posted.get("password", "")
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

    async def logout(request: Request, ctx: Context) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(sessions.SESSION_COOKIE, path="/")
        return response

    async def audit(request: Request, ctx: Context) -> Response:
        entries = await read_audit(source.store, source.keys)
        return ctx.page(request, "audit.html", entries=entries, note=source.audit_note)

    return Starlette(
        routes=[
            Route("/login", login, methods=["GET", "POST"]),
            Route("/logout", guarded(logout), methods=["POST"]),
            *source.routes(guarded),
            Route("/audit", guarded(audit)),
            Mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static"),
        ],
        middleware=[Middleware(_SecurityHeaders)],
    )
