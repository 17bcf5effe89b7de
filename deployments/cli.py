"""``dr``: the project's command line.

    dr up | down | status           the embedded sandbox estate
    dr drill [SCENARIO|all] [--json] run drills on the sandbox
    dr kpis [--since 30d] [--json]  recovery KPIs from the run history
    dr approve FLOW_RUN_ID ...      answer a paused recovery
    dr report FLOW_RUN_ID           rebuild a run's incident report from the Prefect API
    dr unfence CLUSTER              let writes into a fenced primary again
    dr unlock TARGET                release a recovery lock a dead run left behind

Which Prefect server a command talks to:
- ``up``, ``down``, ``status`` and ``drill`` always use the sandbox's own server;
- the operator commands (``report``, ``approve``, ``kpis``, ``unlock``, ``unfence``) use the
  user's configured Prefect (``PREFECT_API_URL``, else the active profile's API URL, Prefect Cloud
  included), else the sandbox's server when it runs, else they refuse.
Prefect fixes its settings at its first import, so the choice is made before that import.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from typing import List, Optional
from uuid import UUID

import typer

from sandbox.paths import load_state, point_at_sandbox, reserve_sandbox_api, state_dir, use_operator_api

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Disaster-recovery flows on Prefect.")

# Set in the environment of a `dr` process that re-executed itself to reach the sandbox's server.
REEXEC_MARK = "DR_REEXECUTED_FOR_API"


def _use_sandbox(start: bool = False) -> str | None:
    """Point this process at the sandbox's Prefect server, before Prefect is imported; its API URL.

    ``start``: the command starts the sandbox, so the server's address is chosen now if it is new.
    """
    root = state_dir()
    if start:
        return reserve_sandbox_api(root)
    state = load_state(root)
    return point_at_sandbox(root, state) if "prefect_port" in state else None


def _use_operator_prefect() -> None:
    """Point this process at the user's Prefect, or the running sandbox's, before Prefect is imported."""
    if use_operator_api(state_dir()) is None:
        _fail("no Prefect server to talk to: set PREFECT_API_URL (or activate a Prefect profile that has one, "
              "e.g. `prefect profile use NAME` or `prefect cloud login`), or start the sandbox with `dr up`")


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
    _use_sandbox(start=True)
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
    _use_sandbox()
    from sandbox import estate

    stopped = estate.down()
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status() -> None:
    """Show whether the sandbox runs, and where."""
    _use_sandbox()
    from sandbox import estate

    if not estate.is_up():
        typer.echo("sandbox is not running (start it with `dr up`)")
        raise typer.Exit(1)
    info = estate.info()
    typer.echo(f"Prefect UI: {info.ui_url}\nPrefect API: {info.api_url}\nprimary DSN: {info.primary_dsn}\nreplica DSN: {info.replica_dsn}")


def _reexec_for(api_url: str) -> None:
    """Run this same command again in a fresh process: Prefect in this one was set up for another server."""
    if os.environ.get(REEXEC_MARK):
        _fail(f"the sandbox's Prefect server moved to {api_url} twice while starting; run the command again")
    typer.echo(f"the sandbox's Prefect server is at {api_url}; starting again to use it ...", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **{REEXEC_MARK: "1"}))


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
    api = _use_sandbox(start=True)
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
    started = estate.up()
    if started.api_url != api:
        _reexec_for(started.api_url)
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


# Answers `dr approve` builds from its own options; the rest of a form comes from --field and the named options.
BASE_ANSWER_FIELDS = ("approve", "approver", "comment")
NAMED_FIELD_OPTIONS = {"accept_data_loss": "--accept-data-loss / --no-accept-data-loss"}


def _field_value(name: str, raw: str, spec: dict):
    """``raw`` (the text after NAME=) as the JSON value the form's field ``name`` expects."""
    kind = spec.get("type")
    if kind == "string":
        return raw
    if kind == "boolean":
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if raw.strip().lower() not in words:
            _fail(f"--field {name}={raw!r}: {name} is a yes/no field; give true or false")
        return words[raw.strip().lower()]
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _form_answer(run_id: UUID, schema: dict, answer: dict, named: dict, fields: list[str]) -> dict:
    """The whole answer to the paused run's form, checked against the form's schema before it is sent."""
    from prefect.utilities.schema_tools import validate

    properties = schema.get("properties") or {}
    known = ", ".join(sorted(properties)) or "none"
    for name, value in named.items():
        if value is not None:
            if name not in properties:
                _fail(f"{NAMED_FIELD_OPTIONS[name]}: the form of flow run {run_id} has no field {name!r} (fields: {known})")
            answer[name] = value
    for item in fields:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            _fail(f"--field {item!r} is not NAME=VALUE")
        if name in BASE_ANSWER_FIELDS:
            _fail(f"--field {name}=...: {name} is given with --approver, --comment and --reject")
        if named.get(name) is not None:
            _fail(f"--field {name}=... and {NAMED_FIELD_OPTIONS[name]} both answer {name}; give one")
        if name not in properties:
            _fail(f"--field {name}=...: the form of flow run {run_id} has no field {name!r} (fields: {known})")
        answer[name] = _field_value(name, raw, properties[name])
    missing = [name for name in schema.get("required") or [] if name not in answer]
    if missing:
        lines = [f"  {name}: {properties.get(name, {}).get('description', '')} "
                 f"(pass {NAMED_FIELD_OPTIONS.get(name, f'--field {name}=VALUE')})" for name in missing]
        _fail(f"the form of flow run {run_id} requires {', '.join(missing)}; nothing was sent:\n" + "\n".join(lines))
    errors = validate(answer, schema, raise_on_error=False)
    if errors:
        detail = "; ".join(f"{'.'.join(str(p) for p in e.path) or 'answer'}: {e.message}" for e in errors)
        _fail(f"the answer does not fit the form of flow run {run_id}; nothing was sent: {detail}")
    return answer


@app.command()
def approve(
    flow_run_id: str = typer.Argument(..., help="The paused flow run."),
    approver: str = typer.Option(..., help="Your name, as listed in the run's allowed approvers."),
    comment: str = typer.Option(..., help="What you checked, or why you reject."),
    reject: bool = typer.Option(False, "--reject", help="Reject instead of approving."),
    accept_data_loss: Optional[bool] = typer.Option(
        None, "--accept-data-loss/--no-accept-data-loss",
        help="Failover forms: accept (or not) the data loss the run's preview states."),
    field: Optional[List[str]] = typer.Option(
        None, "--field", metavar="NAME=VALUE", help="Any other field of the run's form (repeatable)."),
) -> None:
    """Answer a recovery paused for approval (the same form as Resume in the Prefect UI).

    The form is read from the paused run: a field it requires and no option gives is refused by
    name, and the whole answer is checked against the form before it is sent.
    """
    _use_operator_prefect()
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
        keyset = run.state.state_details.run_input_keyset
        stored = client.read_flow_run_input(run_id, keyset["schema"]) if keyset else None
    if not stored:
        _fail(f"flow run {run_id} is paused without an approval form; resume it from the Prefect UI")
    allowed = [a.strip() for a in (run.parameters.get("allowed_approvers") or [])]
    if approver.strip() not in allowed:
        _fail(f"approver {approver.strip()!r} is not allowed for flow run {run_id}; allowed: {', '.join(allowed) or 'nobody'}")
    answer = _form_answer(run_id, json.loads(stored),
                          {"approve": not reject, "approver": approver.strip(), "comment": comment.strip()},
                          {"accept_data_loss": accept_data_loss}, list(field or []))
    try:
        resume_flow_run(run_id, run_input=answer)
    except RuntimeError as exc:
        _fail(f"the server refused the answer to flow run {run_id}: {exc}")
    extra = "".join(f", {k}={v}" for k, v in answer.items() if k not in BASE_ANSWER_FIELDS)
    typer.echo(f"{'rejected' if reject else 'approved'} flow run {run_id} as {approver.strip()}{extra}")


@app.command()
def kpis(
    since: str = typer.Option("30d", help="Window start: a duration (30d, 12h, 90m, 2w) or an ISO-8601 time."),
    as_json: bool = typer.Option(False, "--json", help="Print the KPIs as JSON."),
    publish: bool = typer.Option(True, help="Also save the KPIs as the 'dr-kpis' markdown artifact."),
) -> None:
    """RTO/RPO compliance, recovery and backup success rates and MTTR per scenario, from the run history."""
    _use_operator_prefect()
    from datetime import datetime, timezone

    from blocks.errors import InvalidInput
    from runbook.kpis import collect_runs, compute_kpis, parse_since, publish_kpis, render_kpis

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
    _use_operator_prefect()
    from blocks.errors import RecoveryError
    from runbook.evidence import load_report, render_markdown

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
def unfence(
    cluster_block: str = typer.Argument(..., help="PostgresCluster block name."),
    force: bool = typer.Option(False, "--force", help="Unfence even while a recovery holds the cluster (recorded as an event)."),
) -> None:
    """Let writes into the cluster's primary again after a recovery that did not promote.

    Refused while a recovery holds the cluster's lock: writes taken now may land on a primary
    that the recovery, once approved, moves aside, and they would be missing from its evidence.
    Every unfence is recorded as a ``dr.cluster.unfenced`` event.
    """
    _use_operator_prefect()
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    from blocks import PostgresCluster
    from blocks.errors import RecoveryError
    from blocks.loading import load_block
    from runbook.locks import lock_holder

    holder = lock_holder(cluster_block)
    active = holder if holder and not holder["final"] else None
    if active and not force:
        _fail(f"a recovery holds cluster {cluster_block!r}: flow run {active['flow_run_id']} ({active['state']}, "
              f"since {active.get('since')}); unfencing now lets applications write to a primary that recovery may "
              "move aside. Let that run finish (approve, reject or cancel it) first, or pass --force")
    try:
        cluster = load_block(PostgresCluster, cluster_block)
        cluster.unfence()
    except RecoveryError as exc:
        _fail(str(exc))
    emit_event(
        event="dr.cluster.unfenced",
        resource={"prefect.resource.id": f"dr.cluster.{cluster_block}", "prefect.resource.name": cluster_block},
        payload={"cluster": cluster_block, "primary": cluster.primary.address, "forced": active is not None,
                 "holder": {k: str(active.get(k)) for k in ("flow_run_id", "state", "since")} if active else None},
    )
    EventsWorker.drain_all(timeout=30)
    if active:
        typer.secho(f"warning: unfenced {cluster_block!r} while flow run {active['flow_run_id']} ({active['state']}) "
                    "holds its recovery lock; recorded as a forced unfence", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"primary of {cluster_block} ({cluster.primary.address}) accepts writes again")


@app.command()
def unlock(
    target: str = typer.Argument(..., help="The cluster (or other target) whose recovery lock to release."),
    force: bool = typer.Option(False, "--force", help="Release even though the holder still looks alive."),
) -> None:
    """Release a recovery lock left behind by a run that died without releasing it."""
    _use_operator_prefect()
    from runbook.locks import lock_holder, release_lock

    holder = lock_holder(target)
    if holder and not holder["final"] and not force:
        _fail(f"lock of {target!r} is held by flow run {holder['flow_run_id']} ({holder['state']}); "
              "if that run is really dead, mark it Crashed or Cancelled, or pass --force")
    release_lock(target)
    typer.echo(f"released the recovery lock of {target!r}")


if __name__ == "__main__":
    app()
