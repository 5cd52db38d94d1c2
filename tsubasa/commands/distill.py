"""`tsubasa distill ...`: self-learning (QA synthesis, teacher targets, LoRA training, publishing)
for one user, a list of users, or every user of a tenant with memories newer than their adapter;
`tsubasa distill internalise`: the internalisation measure for one user."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tsubasa.commands.common import ConfigOpt, console, fail, progress, settings_or_exit, setup_logging

app = typer.Typer(no_args_is_help=True, invoke_without_command=True)

VARIANTS = ("tsubasa", "no_grounding", "vanilla")


def _settings(config: Path | None, job_config: Path | None, overrides: dict[str, Any]):
    from tsubasa.config import ConfigError, load_settings

    if job_config is None:
        return settings_or_exit(config, **overrides), None
    from services.train.config import load_job_file

    try:
        settings, job = load_job_file(job_config)
        data = settings.model_dump()
        for dotted, value in overrides.items():
            if value is not None:
                section, _, key = dotted.partition(".")
                data[section][key] = value
        return load_settings(**data), job
    except ConfigError as exc:
        fail(str(exc))
    raise AssertionError  # unreachable


@app.callback()
def distill(
    ctx: typer.Context,
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="Tenant whose users to distil."),
    user: list[str] = typer.Option([], "--user", "-u", help="User id (repeat for several)."),
    all_new: bool = typer.Option(False, "--all-new", help="Every user with memories newer than their adapter."),
    variant: str = typer.Option("tsubasa", "--variant", help="tsubasa | no_grounding | vanilla."),
    d: int | None = typer.Option(None, "--d", min=1, max=1000, help="Teacher top-d (default: distill.top_d)."),
    local: bool = typer.Option(False, "--local/--ray", help="Train in this process instead of on Ray."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Ray Train workers (default: job config)."),
    job_config: Path | None = typer.Option(None, "--job-config", help="Job YAML (settings + job sections)."),
    qa: int | None = typer.Option(None, "--qa", min=1, help="QA pairs per user (distill.qa_per_user)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Training epochs (distill.epochs)."),
    rank: int | None = typer.Option(None, "--rank", min=1, help="LoRA rank (distill.lora_rank)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Base model (model.name)."),
    milvus: str | None = typer.Option(None, "--milvus", help="Milvus URI / Lite file (milvus.uri)."),
    config: Path | None = ConfigOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Distil users' histories into per-user LoRA adapters and publish new versions.

    `tsubasa distill --tenant T --user U` (one or more users) or `--all-new`."""
    if ctx.invoked_subcommand is not None:
        return
    setup_logging(verbose)
    from tsubasa.schema import InvalidIdentifierError, validate_identifier

    if tenant is None:
        fail("--tenant is required")
    if variant not in VARIANTS:
        fail(f"--variant must be one of {', '.join(VARIANTS)} (got {variant!r})")
    if bool(user) == all_new:
        fail("give either --user (one or more) or --all-new")
    try:
        validate_identifier(tenant, "--tenant")
        for u in user:
            validate_identifier(u, "--user")
    except InvalidIdentifierError as exc:
        fail(str(exc))
    overrides = {"distill.qa_per_user": qa, "distill.epochs": epochs, "distill.lora_rank": rank,
                 "model.name": model, "milvus.uri": milvus}
    if rank is not None:
        overrides["distill.lora_alpha"] = 2 * rank
    settings, job = _settings(config, job_config, overrides)
    from tsubasa.distill.pipeline import registry_for, users_needing_adapters
    from tsubasa.distill.train import TrainSpec
    from tsubasa.memory.store import MilvusStore

    spec = TrainSpec.from_config(settings.distill, variant, d)  # type: ignore[arg-type]
    registry = registry_for(settings, spec)
    store = MilvusStore(settings.milvus, uri=settings.milvus_uri)
    users = list(user) or users_needing_adapters(store, registry, tenant)
    if not users:
        console.print(f"no user of {tenant} has memories newer than their adapter")
        return
    console.print(f"[bold]distill[/bold] {spec.tag}: {len(users)} user(s) of {tenant}, model {settings.model.name}, "
                  f"{'local' if local else 'Ray'}; adapters -> {registry.root}")
    if local:
        results = _run_local(settings, tenant, users, spec, store)
        errors: dict[str, str] = {}
    else:
        results, errors = _run_ray(settings, job, workers, tenant, users, spec, store)
    table = Table(title="published adapters")
    for col in ("user", "adapter", "examples", "loss first -> last epoch", "train s", "note"):
        table.add_column(col, overflow="fold")
    for r in results:
        m = r.metrics
        table.add_row(f"{r.tenant_id}/{r.user_id}", r.adapter or "-", f"{m.get('n_examples', 0):.0f}",
                      f"{m.get('loss_first_epoch', float('nan')):.4f} -> {m.get('loss_last_epoch', float('nan')):.4f}",
                      f"{m.get('train_seconds', 0):.1f}", r.skipped or "")
    for k, why in errors.items():
        table.add_row(k, "-", "", "", "", why[:80])
    console.print(table)
    if errors and not results:
        raise typer.Exit(1)


def _run_local(settings, tenant: str, users: list[str], spec, store):
    from tsubasa.distill.pipeline import distill_local

    with progress() as bar:
        tasks: dict[str, int] = {}

        def cb(label: str, stage: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], description=f"{label} {stage}", completed=done, total=total)

        return distill_local(settings, [(tenant, u) for u in users], spec, store=store, progress=cb)


def _run_ray(settings, job, workers: int | None, tenant: str, users: list[str], spec, store):
    from services.train.config import TrainJobConfig
    from services.train.job import JobFailedError, run_distill_job

    job = job or TrainJobConfig()
    if workers is not None:
        job = job.model_copy(update={"num_workers": workers})
    with progress() as bar:
        tasks = {f"{tenant}/{u}": bar.add_task(f"{tenant}/{u} queued", total=settings.distill.epochs) for u in users}

        def cb(key: str, st: dict) -> None:
            if key in tasks:
                status = st.get("status", "")
                bar.update(tasks[key], description=f"{key} {status}", completed=st.get("epoch") or 0)

        try:
            res = run_distill_job(settings, [(tenant, u) for u in users], spec, job, store=store, progress=cb)
        except JobFailedError as exc:
            fail(str(exc), code=1)
    console.print(f"run {res.name}: {res.seconds:.0f} s (checkpoints under {res.storage_path})")
    return res.users, res.errors


@app.command()
def internalise(
    tenant: str = typer.Option(..., "--tenant", "-t"),
    user: str = typer.Option(..., "--user", "-u"),
    ds: str = typer.Option("1,5", "--d", help="Top-d values to train and measure (comma list)."),
    qa: int | None = typer.Option(None, "--qa", min=2, help="QA pairs (distill.qa_per_user)."),
    epochs: int | None = typer.Option(None, "--epochs", min=1),
    rank: int | None = typer.Option(None, "--rank", min=1),
    model: str | None = typer.Option(None, "--model", "-m"),
    milvus: str | None = typer.Option(None, "--milvus"),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the rows as JSON here."),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse",
                               help="Measure adapters `tsubasa distill` published for the same variant, d and "
                                    "training questions instead of training them again."),
    config: Path | None = ConfigOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Internalisation on held-out synthetic questions: mean KL teacher(rich context) -> student and
    greedy-answer agreement, before (base model) and after distillation, for each d and without grounding."""
    setup_logging(verbose)
    overrides: dict[str, Any] = {"distill.qa_per_user": qa, "distill.epochs": epochs, "distill.lora_rank": rank,
                                 "model.name": model, "milvus.uri": milvus}
    if rank is not None:
        overrides["distill.lora_alpha"] = 2 * rank
    settings = settings_or_exit(config, **overrides)
    try:
        d_values = sorted({int(x) for x in ds.split(",") if x.strip()})
    except ValueError:
        fail(f"--d must be a comma list of integers (got {ds!r})")
    from tsubasa.distill.measure import run_internalisation

    with progress() as bar:
        task = bar.add_task("internalisation", total=None)

        def cb(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        try:
            report = run_internalisation(settings, tenant, user, d_values, progress=cb, reuse_published=reuse)
        except (ValueError, KeyError) as exc:
            fail(str(exc), code=1)
    table = Table(title=f"internalisation on {report['n_heldout']} held-out questions of {tenant}/{user} "
                        f"({settings.model.name})")
    for col in ("condition", "adapter", "k", "mean KL teacher->student (nats/token), 95% CI", "agreement, 95% CI"):
        table.add_column(col)
    for r in report["rows"]:
        kl, ag = r["kl_ci"], r["agreement_ci"]
        table.add_row(r["label"], r["adapter"] or "(base)", str(r["grounding_k"]),
                      f"{r['mean_kl']:.4f} [{kl['lo']:.4f}, {kl['hi']:.4f}]",
                      f"{r['agreement']:.2f} [{ag['lo']:.2f}, {ag['hi']:.2f}]")
    console.print(table)
    for tag, t in report["training"].items():
        console.print(f"{tag}: " + (f"published adapter {t['reused']} reused" if "reused" in t
                                    else f"trained in {t['wall_s']:.0f} s"))
    pairs = Table(title="paired differences on the same questions (a - b; KL lower is better)")
    for col in ("a", "b", "KL diff, 95% CI", "agreement diff, 95% CI"):
        pairs.add_column(col)
    for c in report["comparisons"]:
        kl, ag = c["kl_diff"], c["agreement_diff"]
        pairs.add_row(c["a"], c["b"], f"{kl['mean']:+.4f} [{kl['lo']:+.4f}, {kl['hi']:+.4f}]",
                      f"{ag['mean']:+.2f} [{ag['lo']:+.2f}, {ag['hi']:+.2f}]")
    console.print(pairs)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {out}")
