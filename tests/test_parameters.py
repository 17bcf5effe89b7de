"""Every parameter of every flow has a stated valid range, checked in preflight before anything changes."""

from __future__ import annotations

import importlib
import math
import pkgutil
from datetime import datetime, timedelta, timezone

import pytest
from prefect import Flow

import flows
from blocks.errors import InvalidInput
from runbook.parameters import check_parameters, describe, parameter_bounds, problems
from runbook.evidence import load_report


def all_flows() -> list[Flow]:
    found: list[Flow] = []
    for info in pkgutil.iter_modules(flows.__path__):
        if info.ispkg:
            continue
        module = importlib.import_module(f"flows.{info.name}")
        found += [v for v in vars(module).values()
                  if isinstance(v, Flow) and v.fn.__module__ == module.__name__ and v not in found]
    return found


def test_every_parameter_of_every_flow_has_a_stated_range_and_its_default_is_inside_it():
    import inspect

    flows_found = all_flows()
    assert len(flows_found) >= 14
    for flow_obj in flows_found:
        bounds = parameter_bounds(flow_obj)  # KeyError names a parameter without a range
        assert set(bounds) == set(inspect.signature(flow_obj.fn).parameters)
        defaults = {n: p.default for n, p in inspect.signature(flow_obj.fn).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        assert problems(flow_obj, defaults) == [], flow_obj.name
    table = describe(flows_found)
    assert "| database-corruption-recovery | `approval_poll_seconds` | a number of seconds from 0.1 to 60 |" in table


def test_every_flow_checks_its_parameters_in_preflight():
    import inspect

    for flow_obj in all_flows():
        source = inspect.getsource(flow_obj.fn)
        # A recovery's shared preflight (runbook.run.Recovery.preflight) checks them first.
        assert "check_parameters()" in source or ".preflight(" in source, f"{flow_obj.name} does not check its parameters"


NOW = datetime.now(timezone.utc)


@pytest.mark.parametrize("name, value, named", [
    ("approval_poll_seconds", 0, "approval_poll_seconds=0"),
    ("approval_poll_seconds", math.nan, "approval_poll_seconds=nan"),
    ("approval_timeout_seconds", 10**12, "approval_timeout_seconds=1000000000000"),
    ("approval_timeout_seconds", True, "approval_timeout_seconds=True"),
    ("lock_wait_seconds", -1, "lock_wait_seconds=-1"),
    ("incident_id", "inc-1\n", r"incident_id='inc-1\n'"),
    ("incident_id", "../etc", "incident_id='../etc'"),
    ("incident_detected_at", datetime(2026, 1, 1, 12, 0), "no time zone"),
    ("incident_detected_at", NOW + timedelta(hours=1), "in the future"),
    ("allowed_approvers", ["alice", "alice"], "duplicates"),
    ("allowed_approvers", ["ali\x00ce"], "allowed_approvers="),
    ("row_count_tables", ["ledger; DROP TABLE ledger"], "row_count_tables="),
    ("cluster_block", "Sandbox Cluster", "cluster_block='Sandbox Cluster'"),
    ("business_function", "", "business_function=''"),
    ("recovery_target", "", "recovery_target=''"),
    ("take_backup_after", "yes", "take_backup_after='yes'"),
    ("approval_policy", "sometimes", "one of 'required', 'auto'"),
])
def test_a_value_outside_its_range_is_named_with_what_was_expected(name, value, named):
    from flows.db_corruption import db_corruption

    found = problems(db_corruption, {name: value})
    assert len(found) == 1 and named in found[0] and "expected" in found[0], found
    with pytest.raises(InvalidInput, match="nothing was changed"):
        check_parameters(db_corruption, {name: value})


@pytest.mark.parametrize("flow_name, name, value", [
    ("regional_failover:regional_failover", "rollout_timeout_seconds", 0),
    ("regional_failback:regional_failback", "health_failures", 0),
    ("security_breach:security_breach", "kubernetes_kinds", ["deployments", "secretz"]),
    ("app_rollback:app_rollback", "health_urls", ["ftp://example"]),
    ("cache_recovery:cache_recovery", "target_hit_rate", 1.5),
    ("object_storage_recovery:object_storage_recovery", "max_workers", 0),
    ("model_corruption:model_corruption", "serving_deployments", ["Bad_Name"]),
    ("vector_db_recovery:vector_db_recovery", "min_recall", -0.1),
    ("db_failover:db_failover", "failed_port", 70000),
    ("dr_drill:dr_drill", "rows", 10),
    ("backup_validation:backup_validation", "notifier", "no-slash"),
    ("restore_check:restore_check", "row_count_tables", ["a.b.c"]),
])
def test_each_flow_refuses_its_own_parameters(flow_name, name, value):
    module, attr = flow_name.split(":")
    flow_obj = getattr(importlib.import_module(f"flows.{module}"), attr)
    found = problems(flow_obj, {name: value})
    assert len(found) == 1 and found[0].startswith(f"{name}="), found


def test_none_only_where_the_signature_admits_it():
    from flows.db_corruption import db_corruption

    assert problems(db_corruption, {"incident_id": None, "verification_queries": None}) == []
    assert "approval_timeout_seconds=None" in problems(db_corruption, {"approval_timeout_seconds": None})[0]


# Through a real Prefect server: the flows that take no estate to reach their preflight. Each is refused
# before it loads a block (the blocks named here do not exist), so the refusal names the bad parameter.
@pytest.mark.parametrize("module, attr, params, named", [
    ("cache_recovery", "cache_recovery",
     dict(cache_block="no-such-cache", incident_detected_at=NOW, approval_poll_seconds=0), "approval_poll_seconds=0"),
    ("app_rollback", "app_rollback",
     dict(kubernetes_block="no-such-kube", deployment="web", lock_wait_seconds=-5), "lock_wait_seconds=-5"),
    ("object_storage_recovery", "object_storage_recovery",
     dict(store_block="no-such-store", mode="restore-prefix", incident_detected_at=NOW, prefix="photos\n"), "prefix="),
    ("vector_db_recovery", "vector_db_recovery",
     dict(qdrant_block="no-such-qdrant", alias="docs", approval_timeout_seconds=10**12), "approval_timeout_seconds="),
])
def test_a_flow_run_with_a_bad_parameter_ends_refused_before_loading_anything(prefect_api, module, attr, params, named):
    flow_obj = getattr(importlib.import_module(f"flows.{module}"), attr)
    state = flow_obj(**params, return_state=True)
    assert state.is_failed()
    assert named in str(state.message), state.message
    report = load_report(state.state_details.flow_run_id)
    assert report.outcome == "Refused" and named in report.summary
    assert [s.step for s in report.steps] == [report.steps[0].step] and report.steps[0].step.startswith("Preflight")
    assert "no-such" not in report.summary  # refused on the parameter, before any block was read


def test_a_refusal_after_a_change_is_reported_as_a_failure_not_a_refusal():
    from runbook.evidence import RecoveryReport

    report = RecoveryReport(scenario="db-corruption", incident_id="i", target="c", incident_detected_at=NOW,
                            started_at=NOW, rto_objective_seconds=1, rpo_objective_seconds=1)
    with report.step("Preflight: validate inputs"):
        pass
    with report.step("Health evidence: primary region"):
        pass
    assert report.outcome_for(InvalidInput("bad")) == "Refused"
    assert report.outcome_for(RuntimeError("boom")) == "Failed"
    with report.step("Fence writes"):
        pass
    assert report.outcome_for(InvalidInput("refused after the fence")) == "Failed"


def test_a_parameter_of_the_wrong_type_is_refused_naming_its_value(prefect_api):
    from flows.cache_recovery import cache_recovery

    state = cache_recovery(cache_block="no-such-cache", incident_detected_at="yesterday", approval_policy="AUTO",
                           warmup_window_seconds="soon", return_state=True)
    assert state.is_failed()
    message = str(state.message) + str(state.result(raise_on_failure=False))
    for named in ("incident_detected_at='yesterday'", "approval_policy='AUTO'", "warmup_window_seconds='soon'"):
        assert named in message, message


def test_every_deployment_in_prefect_yaml_passes_parameters_within_their_ranges():
    from pathlib import Path

    import yaml

    project = yaml.safe_load((Path(__file__).resolve().parent.parent / "prefect.yaml").read_text())
    assert project["deployments"]
    for deployment in project["deployments"]:
        module, attr = deployment["entrypoint"].split(":")
        flow_obj = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), attr)
        given = {k: v for k, v in (deployment.get("parameters") or {}).items() if not (isinstance(v, str) and "{{" in v)}
        assert problems(flow_obj, given) == [], deployment["name"]
