"""Severity is an input of every recovery: P0-P3 or Sev1-Sev4, a default per scenario, on the run's tags."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import redis
from prefect.client.orchestration import get_client

from blocks.errors import InvalidInput
from blocks.routing import IncidentRouting, normalize_severity
from runbook.evidence import load_report
from runbook.parameters import parameter_bounds
from tests.test_parameters import all_flows
from runbook.run import DEFAULT_SEVERITY


@pytest.mark.parametrize("given, expected", [("P0", "P0"), ("p3", "P3"), ("Sev1", "P0"), ("SEV-4", "P3"),
                                             ("sev 2", "P1")])
def test_severities_and_their_synonyms(given, expected):
    assert normalize_severity(given) == expected


@pytest.mark.parametrize("given", ["P4", "Sev0", "critical", "", "P1x"])
def test_an_unknown_severity_is_refused_naming_it(given):
    with pytest.raises(InvalidInput, match="severity="):
        normalize_severity(given)


def test_every_recovery_takes_a_severity_and_every_scenario_has_a_default():
    import importlib

    recoveries = [f for f in all_flows() if "severity" in parameter_bounds(f)]
    assert len(recoveries) == 10, [f.name for f in recoveries]
    for flow_obj in recoveries:
        scenario = importlib.import_module(flow_obj.fn.__module__).SCENARIO
        assert scenario in DEFAULT_SEVERITY, scenario
    assert set(IncidentRouting().routes) == {"P0", "P1", "P2", "P3"}


def _tags(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).tags


def test_a_recovery_records_its_severity_and_tags_its_run(redis_cache, redis_server):
    from flows.cache_recovery import cache_recovery

    name, _ = redis_cache
    redis.Redis.from_url(f"{redis_server}/3").mset({"a": "1"})
    detected = datetime.now(timezone.utc)
    state = cache_recovery(cache_block=name, incident_detected_at=detected, severity="Sev2", dry_run=True,
                           approval_policy="none", return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "DryRun" and report.severity == "P1"
    assert {"dr-severity:P1", "dr-scenario:cache", f"dr-incident:{report.incident_id}"} <= set(
        _tags(state.state_details.flow_run_id))

    state = cache_recovery(cache_block=name, incident_detected_at=detected, dry_run=True, approval_policy="none",
                           return_state=True)
    assert load_report(state.state_details.flow_run_id).severity == DEFAULT_SEVERITY["cache"]


def test_an_unknown_severity_refuses_the_run_and_flushes_nothing(redis_cache, redis_server):
    from flows.cache_recovery import cache_recovery

    name, _ = redis_cache
    redis.Redis.from_url(f"{redis_server}/3").mset({"keep": "1"})
    state = cache_recovery(cache_block=name, incident_detected_at=datetime.now(timezone.utc), severity="P7",
                           approval_policy="none", return_state=True)
    assert state.is_failed()
    report = load_report(state.state_details.flow_run_id)
    assert report.outcome == "Refused" and "severity='P7'" in report.summary
    assert redis.Redis.from_url(f"{redis_server}/3").get("keep") == b"1"
