"""`tsubasa adapters ...`: the per-user adapter registry (versions, current pointer, manifests)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tsubasa.commands.common import ConfigOpt, console, fail, settings_or_exit, setup_logging
from tsubasa.schema import InvalidIdentifierError

app = typer.Typer(no_args_is_help=True)

RootOpt = typer.Option(None, "--root", help="Registry root (local path or fsspec URL); default: adapters.root.")


def _registry(config: Path | None, root: str | None):
    from tsubasa.distill.adapters import AdapterRegistry

    settings = settings_or_exit(config)
    return AdapterRegistry(root or settings.adapter_root, keep_versions=settings.adapters.keep_versions)


@app.command("list")
def list_(tenant: str = typer.Option(..., "--tenant", "-t", help="Tenant id."),
          user: str | None = typer.Option(None, "--user", "-u", help="Only this user."),
          root: str | None = RootOpt, config: Path | None = ConfigOpt) -> None:
    """Adapter versions of a tenant's users; `*` marks the version serving uses."""
    setup_logging()
    reg = _registry(config, root)
    try:
        versions = reg.list(tenant, user)
        current = {u: reg.current_version(tenant, u) for u in {v.user_id for v in versions}}
    except InvalidIdentifierError as exc:
        fail(str(exc))
    table = Table(title=f"adapters of {tenant}" + (f"/{user}" if user else "") + f" in {reg.root}")
    for col in ("", "adapter", "variant", "loss", "d", "k", "rank", "examples", "final loss", "created"):
        table.add_column(col, overflow="fold")  # names and dates are never cut with an ellipsis
    for v in versions:
        m = v.manifest
        table.add_row("*" if current.get(v.user_id) == v.version else "", v.name, m.variant, m.loss, str(m.d),
                      str(m.grounding_k), str(m.rank), str(m.n_examples),
                      f"{m.metrics.get('loss_last_epoch', float('nan')):.4f}",
                      m.created_at.isoformat(timespec="seconds"))
    if not versions:
        table.add_row("", "-", "", "", "", "", "", "", "", "")
    console.print(table)


@app.command()
def show(name: str = typer.Argument(..., help="<tenant>/<user>/vNNNN, or <tenant>/<user> for the current one."),
         root: str | None = RootOpt, config: Path | None = ConfigOpt) -> None:
    """One version's manifest, location and files."""
    from tsubasa.distill.adapters import AdapterNotFoundError

    setup_logging()
    reg = _registry(config, root)
    try:
        if name.count("/") == 1:
            tenant, user = name.split("/")
            v = reg.current(tenant, user)
            if v is None:
                fail(f"{name} has no adapter", code=1)
        else:
            v = reg.get_by_name(name)
    except (AdapterNotFoundError, ValueError) as exc:
        fail(str(exc), code=1)
    assert v is not None
    path = Path(reg.local_path(v))
    is_current = reg.current_version(v.tenant_id, v.user_id) == v.version
    console.print(f"[bold]{v.name}[/bold]  ({'current' if is_current else 'not current'})")
    console.print(f"uri: {v.uri}")
    console.print(json.dumps(v.manifest.model_dump(mode="json"), indent=2))
    for f in sorted(path.iterdir()):
        console.print(f"  {f.name}  {f.stat().st_size:,} bytes")


@app.command()
def delete(tenant: str = typer.Option(..., "--tenant", "-t"), user: str = typer.Option(..., "--user", "-u"),
           root: str | None = RootOpt, config: Path | None = ConfigOpt,
           yes: bool = typer.Option(False, "--yes", help="Do not ask.")) -> None:
    """Forget a user's adapters (every version). Idempotent."""
    setup_logging()
    if not yes:
        typer.confirm(f"delete every adapter of {tenant}/{user}?", abort=True)
    try:
        n = _registry(config, root).delete_user(tenant, user)
    except InvalidIdentifierError as exc:
        fail(str(exc))
    console.print(f"deleted {n} version(s) of {tenant}/{user}")
