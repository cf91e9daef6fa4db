"""A cluster node's console pages (``frcluster/agent.py`` serves them): the cluster
(nodes, the broker, the store), the VMs, one VM (its record and the actions
``broker/admin.py`` offers: migrate, failover, delete), the cluster-wide settings.

What the cluster store does not know is not shown as if it did: a VM's replication health
and lag are the primary's to tell (``frctl replication status`` on it); the recovery
points are on the owner node's disks. The pages say so.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from broker import admin
from broker.cluster_view import read_audit, read_cluster
from broker.election import current_holder
from broker.records import PLACEMENT_POLICIES, Keys, NodeState, Settings, VMRecord
from broker.store import ClusterStore

from .app import Context, Guard, ReplicaReport


@dataclass(frozen=True)
class ConsoleSource:
    """What a cluster node's console serves: a cluster store, its keys, and the node
    serving it."""

    store: ClusterStore
    keys: Keys
    node: str  #: the node agent serving this console (shown on every page)
    store_url: str  #: shown on the cluster page, without any credentials in it
    #: What this node can say of a replica it owns (``None``: it holds no data of it);
    #: the recovery points live on the owner's disks, not in the store.
    replica: Callable[[VMRecord], Awaitable[ReplicaReport | None]] | None = None

    @property
    def served_by(self) -> str:
        return f"node {self.node}"

    @property
    def store_name(self) -> str:
        return "the cluster store"

    @property
    def password_hint(self) -> str:
        return "run `frctl cluster admin-password` on a node first"

    @property
    def audit_note(self) -> str:
        return (
            "Every change made through the console or frctl cluster, written in the "
            "same transaction as the change itself. Newest first."
        )

    @property
    def nav(self) -> Sequence[tuple[str, str]]:
        return (("/", "Cluster"), ("/vms", "VMs"), ("/settings", "Settings"))

    def routes(self, guarded: Guard) -> list[BaseRoute]:
        return cluster_routes(self, guarded)


def _safe_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urllib.parse.urlunsplit(parts)


def cluster_routes(source: ConsoleSource, guarded: Guard) -> list[BaseRoute]:
    """The cluster console's pages."""

    # -- pages ----------------------------------------------------------------------------

    async def cluster(request: Request, ctx: Context) -> Response:
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

    async def node_action(request: Request, ctx: Context) -> Response:
        name = request.path_params["node"]
        action = request.path_params["action"]
        if action not in ("drain", "undrain"):
            return ctx.page(request, "error.html", 404, message=f"no action {action!r}")
        await admin.set_draining(
            source.store, source.keys, name, draining=action == "drain", by=ctx.who
        )
        return RedirectResponse("/", status_code=303)

    async def vms(request: Request, ctx: Context) -> Response:
        view = await read_cluster(source.store, source.keys)
        rows = sorted(view.vms.values(), key=lambda v: (v.deleted, v.name, v.vmid))
        return ctx.page(request, "vms.html", vms=rows, up=sorted(view.nodes))

    async def vm_page(
        request: Request, ctx: Context, message: str = "", error: str = "", status: int = 200
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

    async def vm(request: Request, ctx: Context) -> Response:
        return await vm_page(request, ctx)

    async def vm_action(request: Request, ctx: Context) -> Response:
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
        ctx: Context,
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

    async def settings(request: Request, ctx: Context) -> Response:
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

    return [
        Route("/", guarded(cluster)),
        Route("/nodes/{node}/{action}", guarded(node_action), methods=["POST"]),
        Route("/vms", guarded(vms)),
        Route("/vms/{vmid}", guarded(vm)),
        Route("/vms/{vmid}/{action}", guarded(vm_action), methods=["POST"]),
        Route("/settings", guarded(settings), methods=["GET", "POST"]),
    ]


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
