"""Key performance indicators of the recovery programme, computed from the Prefect run history.

From the continuity plan's "Key Performance Indicators" and "Success Criteria":
- recovery success rate: share of recovery runs that completed (service restored);
- RTO compliance: share of restored runs (incidents and drills) that restored service within the RTO objective;
- RPO compliance: share of restored runs whose data-loss window was within the RPO objective;
- backup success rate: share of backup-validation and restore-test runs that passed;
- MTTR per scenario: mean time from detection to service restored, over successful runs.

How runs count:
- A recovery run is a flow run that published a recovery report (``dr-report``). Not counted at all:
  dry runs, refused input (``Refused``: nothing was attempted), assurance runs (reports whose
  ``facts["run_kind"]`` is ``"assurance"``, e.g. scheduled replica checks) and restore tests
  (counted as backup runs).
- ``Rejected`` (Cancelled) and ``ApprovalTimedOut`` runs are recovery runs that did not recover: they
  lower the recovery success rate, and are listed apart as "not approved".
- RTO and RPO compliance are measured over restored runs only: runs that reached a service-restored
  point (an RTO was measured). A restored run without an RPO measurement misses the RPO objective.
  Runs that never restored service are visible in the recovery success rate, not in compliance.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.input.actions import read_flow_run_input

from blocks.errors import InvalidInput
from runbook.evidence import REPORT_KEY

BACKUP_FLOWS = ("backup-validation", "restore-test")
NOT_RECOVERIES = ("restore-test",)
NOT_APPROVED = ("Rejected", "ApprovalTimedOut")
ASSURANCE = "assurance"
FINAL = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
_DURATION = re.compile(r"^(\d+)([mhdw])$")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``30d``, ``12h``, ``90m``, ``2w`` or an ISO-8601 time with offset, as the window's start."""
    now = now or datetime.now(timezone.utc)
    match = _DURATION.match(value.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        if amount <= 0:
            raise InvalidInput(f"window {value!r} must be longer than zero")
        return now - timedelta(**{{"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[unit]: amount})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"window start {value!r} is not a duration like 30d/12h/90m/2w or an ISO-8601 time") from exc
    if moment.tzinfo is None:
        raise InvalidInput(f"window start {value!r} has no time zone; give an explicit UTC offset")
    return moment


@dataclass(frozen=True)
class RunRecord:
    """What the KPIs need from one finished flow run."""

    flow_run_id: str
    flow_name: str
    state_type: str
    state_name: str
    started_at: datetime | None
    scenario: str | None = None
    outcome: str | None = None
    drill: bool = False
    dry_run: bool = False
    rto_seconds: float | None = None
    rto_objective_seconds: int | None = None
    rpo_seconds: float | None = None
    rpo_objective_seconds: int | None = None
    run_kind: str | None = None

    @property
    def is_recovery(self) -> bool:
        return (self.scenario is not None and self.scenario not in NOT_RECOVERIES and not self.dry_run
                and self.outcome != "Refused" and self.run_kind != ASSURANCE)

    @property
    def restored(self) -> bool:
        """The run reached a service-restored point: its RTO was measured."""
        return self.rto_seconds is not None

    @property
    def not_approved(self) -> bool:
        return self.outcome in NOT_APPROVED

    @property
    def succeeded(self) -> bool:
        return self.state_type == "COMPLETED"


@dataclass
class ScenarioKpi:
    scenario: str
    runs: int
    succeeded: int
    restored: int
    rto_met: int
    rpo_met: int
    mttr_seconds: float | None


@dataclass
class Kpis:
    since: datetime
    until: datetime
    recovery_runs: int
    drill_runs: int
    restored_runs: int
    not_approved_runs: int
    rto_compliance: float | None
    rpo_compliance: float | None
    recovery_success_rate: float | None
    backup_runs: int
    backup_success_rate: float | None
    scenarios: list[ScenarioKpi] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["since"], data["until"] = self.since.isoformat(), self.until.isoformat()
        return data


def _rate(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(100.0 * part / whole, 1)


def _met(value: float | None, objective: int | None) -> bool:
    return value is not None and objective is not None and value <= objective


def compute_kpis(records: list[RunRecord], since: datetime, until: datetime) -> Kpis:
    """The KPIs of ``records`` (finished runs started inside the window)."""
    inside = [r for r in records if r.started_at is None or since <= r.started_at <= until]
    recoveries = [r for r in inside if r.is_recovery]
    backups = [r for r in inside if r.flow_name in BACKUP_FLOWS]
    scenarios = []
    for name in sorted({r.scenario for r in recoveries}):
        runs = [r for r in recoveries if r.scenario == name]
        ok = [r for r in runs if r.succeeded and r.rto_seconds is not None]
        scenarios.append(ScenarioKpi(
            scenario=name, runs=len(runs), succeeded=sum(r.succeeded for r in runs),
            restored=sum(r.restored for r in runs),
            rto_met=sum(_met(r.rto_seconds, r.rto_objective_seconds) for r in runs),
            rpo_met=sum(_met(r.rpo_seconds, r.rpo_objective_seconds) for r in runs),
            mttr_seconds=round(sum(r.rto_seconds for r in ok) / len(ok), 1) if ok else None,
        ))
    restored = [r for r in recoveries if r.restored]
    return Kpis(
        since=since, until=until,
        recovery_runs=len(recoveries), drill_runs=sum(r.drill for r in recoveries),
        restored_runs=len(restored), not_approved_runs=sum(r.not_approved for r in recoveries),
        rto_compliance=_rate(sum(_met(r.rto_seconds, r.rto_objective_seconds) for r in restored), len(restored)),
        rpo_compliance=_rate(sum(_met(r.rpo_seconds, r.rpo_objective_seconds) for r in restored), len(restored)),
        recovery_success_rate=_rate(sum(r.succeeded for r in recoveries), len(recoveries)),
        backup_runs=len(backups), backup_success_rate=_rate(sum(r.succeeded for r in backups), len(backups)),
        scenarios=scenarios,
    )


def collect_runs(since: datetime, until: datetime | None = None, tags: list[str] | None = None,
                 page_size: int = 200, max_runs: int = 10_000) -> list[RunRecord]:
    """Finished flow runs started in the window, with the figures of their recovery reports."""
    until = until or datetime.now(timezone.utc)
    flt = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since, before_=until),
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=FINAL)),
                        tags=FlowRunFilterTags(all_=tags) if tags else None)
    records: list[RunRecord] = []
    with get_client(sync_client=True) as client:
        flow_names: dict = {}
        offset = 0
        while offset < max_runs:
            page = client.read_flow_runs(flow_run_filter=flt, sort=FlowRunSort.START_TIME_ASC, limit=page_size,
                                         offset=offset)
            for run in page:
                if run.flow_id not in flow_names:
                    flow_names[run.flow_id] = client.read_flow(run.flow_id).name
                report = read_flow_run_input(REPORT_KEY, flow_run_id=run.id)
                report = report if isinstance(report, dict) else {}
                facts = report.get("facts") if isinstance(report.get("facts"), dict) else {}
                records.append(RunRecord(
                    flow_run_id=str(run.id), flow_name=flow_names[run.flow_id],
                    state_type=run.state.type.value if run.state else "UNKNOWN",
                    state_name=run.state.name if run.state else "",
                    started_at=run.start_time, scenario=report.get("scenario"), outcome=report.get("outcome"),
                    drill=bool(report.get("drill")), dry_run=bool(report.get("dry_run")),
                    rto_seconds=report.get("rto_seconds"), rto_objective_seconds=report.get("rto_objective_seconds"),
                    rpo_seconds=report.get("rpo_seconds"), rpo_objective_seconds=report.get("rpo_objective_seconds"),
                    run_kind=facts.get("run_kind"),
                ))
            if len(page) < page_size:
                break
            offset += page_size
    return records


def _pct(value: float | None) -> str:
    return "n/a (no runs)" if value is None else f"{value:.1f} %"


def _dur(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


COUNTING = (
    "How runs count: dry runs, refused input, assurance runs (replica checks) and restore tests are not "
    "recovery runs. Rejected and approval-timed-out runs count as recovery runs that did not recover. "
    "RTO and RPO compliance are measured over runs that restored service; a run that never restored "
    "service lowers the recovery success rate instead."
)


def render_kpis(k: Kpis) -> str:
    """The KPIs as markdown, against the plan's targets."""
    lines = [
        f"# Recovery KPIs {k.since:%Y-%m-%d %H:%M} .. {k.until:%Y-%m-%d %H:%M} UTC",
        "",
        "| KPI | Value | Target |",
        "|---|---|---|",
        f"| RTO compliance | {_pct(k.rto_compliance)} | >= 95 % |",
        f"| RPO compliance | {_pct(k.rpo_compliance)} | >= 95 % |",
        f"| Recovery success rate | {_pct(k.recovery_success_rate)} | > 95 % |",
        f"| Backup success rate | {_pct(k.backup_success_rate)} | > 99 % |",
        "",
        f"{k.recovery_runs} recovery runs ({k.drill_runs} drills, {k.restored_runs} restored service, "
        f"{k.not_approved_runs} not approved), {k.backup_runs} backup validation / restore test runs.",
        "",
        "| Scenario | Runs | Succeeded | Restored | RTO met | RPO met | MTTR |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {s.scenario} | {s.runs} | {s.succeeded} | {s.restored} | {s.rto_met} | {s.rpo_met} "
              f"| {_dur(s.mttr_seconds)} |" for s in k.scenarios] or ["| - | 0 | 0 | 0 | 0 | 0 | - |"]
    lines += ["", COUNTING]
    return "\n".join(lines) + "\n"


def publish_kpis(k: Kpis, key: str = "dr-kpis") -> None:
    """Create the KPI markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=render_kpis(k), key=key, description="Recovery KPIs from the run history")
