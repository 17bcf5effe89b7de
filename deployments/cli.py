"""``dr``: the project's command line.

    dr up | down | status           the embedded sandbox estate
    dr drill [SCENARIO|all] [--json] run drills on the sandbox
    dr kpis [--since 30d] [--json]  recovery KPIs from the run history
    dr approve FLOW_RUN_ID ...      answer a paused recovery
    dr report FLOW_RUN_ID           rebuild a run's incident report from the Prefect API
    dr unfence CLUSTER              let writes into a fenced primary again
    dr unlock TARGET                release a recovery lock a dead run left behind
"""

from __future__ import annotations

# Prefect reads its settings once, at import: point at the sandbox's server first.
from sandbox.paths import use_sandbox_api

use_sandbox_api()

import json  # noqa: E402
import sys  # noqa: E402
from enum import Enum  # noqa: E402
from uuid import UUID  # noqa: E402

import typer  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Disaster-recovery flows on Prefect.")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _flow_run_id(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        _fail(f"flow run id {value!r} is not a UUID (copy it from the Prefect UI or `prefect flow-run ls`)")


@app.command()
def up(deploy: bool = typer.Option(True, help="Also create the work pool, deploy the flows and start a worker.")) -> None:
    """Start the sandbox estate (creating it the first time). Safe to run again."""
    from sandbox import estate

    info = estate.up(deploy=deploy)
    typer.echo(f"state directory : {info.root}")
    typer.echo(f"Prefect UI      : {info.ui_url}")
    typer.echo(f"Prefect API     : {info.api_url}")
    typer.echo(f"primary DSN     : {info.primary_dsn}")
    typer.echo(f"replica DSN     : {info.replica_dsn}")
    typer.echo(f"cluster block   : {info.cluster_block} (password in the block and {info.root}/pg/pgpass)")
    for warning in info.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


@app.command()
def down() -> None:
    """Stop every sandbox process (worker, Prefect server, PostgreSQL). Data stays for the next `dr up`."""
    from sandbox import estate

    stopped = estate.down()
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status() -> None:
    """Show whether the sandbox runs, and where."""
    from sandbox import estate

    if not estate.is_up():
        typer.echo("sandbox is not running (start it with `dr up`)")
        raise typer.Exit(1)
    info = estate.info()
    typer.echo(f"Prefect UI: {info.ui_url}\nprimary DSN: {info.primary_dsn}\nreplica DSN: {info.replica_dsn}")


def _drill_notes(extra: dict) -> list[str]:
    """The scenario-specific figures of a drill worth a line of their own."""
    notes = []
    if extra.get("containment_seconds") is not None:
        notes.append(f"containment (detected -> isolated): {extra['containment_seconds']:.1f}s")
    if "measured_rpo_rows" in extra:
        notes.append(f"measured under write load: {extra['measured_rpo_rows']} committed rows missing, "
                     f"{extra.get('measured_rpo_seconds', 0):.3f}s of commits")
    return notes


@app.command()
def drill(
    scenario: str = typer.Argument("all", help="Scenario to drill, or 'all'."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of results."),
    rows: int = typer.Option(100_000, help="Rows to seed for database drills."),
) -> None:
    """Inject a fault into the sandbox, run its recovery with the drill approval policy, and check it.

    Each drill runs as a run of the dr-drill flow, with the recovery as its subflow and a test report artifact.
    """
    from flows.dr_drill import dr_drill
    from sandbox import drills, estate
    from sandbox.drillkit import DrillResult

    names = list(drills.DRILLS) if scenario == "all" else [scenario]
    unknown = [n for n in names if n not in drills.DRILLS]
    if unknown:
        _fail(f"unknown drill {unknown[0]!r}; known: {', '.join(drills.DRILLS)}, all")
    if rows < 1000:
        _fail(f"--rows {rows} is too small for a meaningful drill; use at least 1000")
    typer.echo("bringing the sandbox up to date ...", err=True)
    estate.up()
    results = []
    for name in names:
        typer.echo(f"drill {name} ...", err=True)
        state = dr_drill(scenario=name, rows=rows, return_state=True)
        data = state.result(raise_on_failure=False)
        if isinstance(data, list) and data:
            results.extend(DrillResult(**item) for item in data)
        else:
            results.append(DrillResult(scenario=name, passed=False, rto_seconds=None, rto_objective_seconds=0,
                                       rpo_seconds=None, rpo_objective_seconds=0,
                                       flow_run_id=str(state.state_details.flow_run_id), outcome=state.name or "Failed",
                                       report="", ui_url="",
                                       checks=[{"name": "drill flow", "passed": False, "detail": str(data)}]))
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        width = max([len("scenario"), *(len(r.scenario) for r in results)])
        typer.echo(f"{'scenario':<{width}} {'RTO achieved/objective':<26} {'RPO achieved/objective':<26} {'verdict':<8} report")
        for r in results:
            rto = f"{r.rto_seconds:.1f}s / {r.rto_objective_seconds}s" if r.rto_seconds is not None else f"- / {r.rto_objective_seconds}s"
            rpo = f"{r.rpo_seconds:.1f}s / {r.rpo_objective_seconds}s" if r.rpo_seconds is not None else f"- / {r.rpo_objective_seconds}s"
            typer.echo(f"{r.scenario:<{width}} {rto:<26} {rpo:<26} {'PASS' if r.passed else 'FAIL':<8} {r.report}")
            for note in _drill_notes(r.extra):
                typer.echo(f"    {note}")
            for c in r.checks:
                if not c["passed"]:
                    typer.echo(f"    failed check: {c['name']}: {c['detail']}")
    if not all(r.passed for r in results):
        raise typer.Exit(1)


@app.command()
def approve(
    flow_run_id: str = typer.Argument(..., help="The paused flow run."),
    approver: str = typer.Option(..., help="Your name, as listed in the run's allowed approvers."),
    comment: str = typer.Option(..., help="What you checked, or why you reject."),
    reject: bool = typer.Option(False, "--reject", help="Reject instead of approving."),
) -> None:
    """Answer a recovery paused for approval (the same as the Resume form in the Prefect UI)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    run_id = _flow_run_id(flow_run_id)
    if not approver.strip():
        _fail("--approver is empty; give your name")
    if not comment.strip():
        _fail("--comment is empty; say what you checked or why you reject")
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound:
            _fail(f"no flow run {run_id} on {client.api_url}")
    if not run.state or not run.state.is_paused():
        _fail(f"flow run {run_id} is not paused (state: {run.state.name if run.state else 'none'}); nothing to approve")
    allowed = [a.strip() for a in (run.parameters.get("allowed_approvers") or [])]
    if approver.strip() not in allowed:
        _fail(f"approver {approver.strip()!r} is not allowed for flow run {run_id}; allowed: {', '.join(allowed) or 'nobody'}")
    resume_flow_run(run_id, run_input={"approve": not reject, "approver": approver.strip(), "comment": comment.strip()})
    typer.echo(f"{'rejected' if reject else 'approved'} flow run {run_id} as {approver.strip()}")


@app.command()
def kpis(
    since: str = typer.Option("30d", help="Window start: a duration (30d, 12h, 90m, 2w) or an ISO-8601 time."),
    as_json: bool = typer.Option(False, "--json", help="Print the KPIs as JSON."),
    publish: bool = typer.Option(True, help="Also save the KPIs as the 'dr-kpis' markdown artifact."),
) -> None:
    """RTO/RPO compliance, recovery and backup success rates and MTTR per scenario, from the run history."""
    from datetime import datetime, timezone

    from blocks.errors import InvalidInput
    from tasks.kpis import collect_runs, compute_kpis, parse_since, publish_kpis, render_kpis

    try:
        start = parse_since(since)
    except InvalidInput as exc:
        _fail(str(exc))
    end = datetime.now(timezone.utc)
    result = compute_kpis(collect_runs(start, end), start, end)
    if publish:
        publish_kpis(result)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        sys.stdout.write(render_kpis(result))


class ReportFormat(str, Enum):
    md = "md"
    json = "json"


@app.command()
def report(
    flow_run_id: str = typer.Argument(..., help="The recovery's flow run."),
    format: ReportFormat = typer.Option(ReportFormat.md, "--format", help="md or json."),
) -> None:
    """Rebuild a run's incident report from the Prefect API alone."""
    from blocks.errors import RecoveryError
    from tasks.evidence import load_report, render_markdown

    run_id = _flow_run_id(flow_run_id)
    try:
        rep = load_report(run_id)
    except RecoveryError as exc:
        _fail(str(exc))
    if format is ReportFormat.json:
        typer.echo(json.dumps(rep.model_dump(mode="json"), indent=2))
    else:
        sys.stdout.write(render_markdown(rep))


@app.command()
def unfence(cluster_block: str = typer.Argument(..., help="PostgresCluster block name.")) -> None:
    """Let writes into the cluster's primary again after a recovery that did not promote."""
    from blocks import PostgresCluster
    from blocks.errors import RecoveryError
    from tasks.estate import load_block

    try:
        cluster = load_block(PostgresCluster, cluster_block)
        cluster.unfence()
    except RecoveryError as exc:
        _fail(str(exc))
    typer.echo(f"primary of {cluster_block} ({cluster.primary.address}) accepts writes again")


@app.command()
def unlock(
    target: str = typer.Argument(..., help="The cluster (or other target) whose recovery lock to release."),
    force: bool = typer.Option(False, "--force", help="Release even though the holder still looks alive."),
) -> None:
    """Release a recovery lock left behind by a run that died without releasing it."""
    from tasks.locks import lock_holder, release_lock

    holder = lock_holder(target)
    if holder and not holder["final"] and not force:
        _fail(f"lock of {target!r} is held by flow run {holder['flow_run_id']} ({holder['state']}); "
              "if that run is really dead, mark it Crashed or Cancelled, or pass --force")
    release_lock(target)
    typer.echo(f"released the recovery lock of {target!r}")


if __name__ == "__main__":
    app()
