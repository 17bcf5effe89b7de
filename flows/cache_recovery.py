"""Cache corruption: flush the affected Redis database, let applications repopulate it, watch the warm-up.

Runbook (continuity plan: "Cache (Redis)"; Redis is ephemeral, RPO not applicable):
  1. preflight: the cache answers; record its keyspace, hit counters and latency
  2. approval (policy: 'required', 'none' for on-call self-service, 'auto' for drills)
  3. flush the affected database only (FLUSHDB, never FLUSHALL)
  4. applications repopulate the cache from the database; watch key count, hit rate and latency
     over a bounded window
  5. the incident report: the warm-up curve and the latency before and after

Figures: the hit rate comes from Redis' keyspace_hits and keyspace_misses counters, which are
server-wide (every database of the server, not only the flushed one); an interval in which they went
backwards (CONFIG RESETSTAT, a restart) has no hit rate. Service counts as restored when the cache is
warm (enough keys and the target hit rate) within the watched window; when it is not, the flush time
is used and the report says so.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Literal

from prefect import get_run_logger, runtime
from prefect.states import Cancelled, Completed, Failed, State

from blocks import CheckResult, RecoveryObjectives
from blocks.errors import InvalidInput
from blocks.redis_cache import CacheStats, RedisCache
from runbook.parameters import check_parameters, recovery_flow
from runbook.approval import approval_step, check_approval_settings
from blocks.loading import load_block
from runbook.evidence import RecoveryReport, publish_evidence, utcnow
from runbook.locks import recovery_lock
from tasks.redis import flush_cache_db, inspect_cache, measure_cache_latency, ping_cache, sample_cache_stats

SCENARIO = "cache"
CachePolicy = Literal["required", "none", "auto"]


def hit_rate(earlier: CacheStats, later: CacheStats) -> float | None:
    """Hits over lookups between two samples; None when nothing was looked up or the counters were reset."""
    hits = later.keyspace_hits - earlier.keyspace_hits
    misses = later.keyspace_misses - earlier.keyspace_misses
    if hits < 0 or misses < 0:
        return None
    lookups = hits + misses
    return None if lookups <= 0 else round(hits / lookups, 4)


def counters_reset(earlier: CacheStats, later: CacheStats) -> bool:
    """Whether the server's hit or miss counter went backwards between two samples (reset or restart)."""
    return later.keyspace_hits < earlier.keyspace_hits or later.keyspace_misses < earlier.keyspace_misses


def _percent(rate: float | None, reset: bool = False) -> str:
    if reset:
        return "counters reset"
    return "no lookups" if rate is None else f"{rate:.0%}"


def _incident_key(cache_block: str, detected: datetime) -> str:
    return f"{cache_block}-{detected.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"


def _refuse_bad_input(detected: datetime, started: datetime, window: float, interval: float, policy: str,
                      approvers: list[str], approval_timeout: int, drill: bool, target_hit_rate: float) -> None:
    if detected.tzinfo is None or detected.utcoffset() is None:
        raise InvalidInput(f"incident_detected_at {detected.isoformat()} has no time zone; give it with a UTC offset")
    if detected > started:
        raise InvalidInput(f"incident_detected_at {detected.isoformat()} is in the future (now {started.isoformat()})")
    if not 0 < interval <= window <= 3600:
        raise InvalidInput(f"warm-up window {window} s and sample interval {interval} s: expected "
                           "0 < interval <= window <= 3600")
    if not 0 <= target_hit_rate <= 1:
        raise InvalidInput(f"target hit rate {target_hit_rate} is not between 0 and 1")
    if policy not in ("required", "none", "auto"):
        raise InvalidInput(f"approval policy {policy!r} is not 'required', 'none' or 'auto'")
    if policy != "none":
        check_approval_settings(policy, approvers, approval_timeout, drill)


@recovery_flow(name="cache-recovery", description="Flush the affected Redis database, then watch the cache warm up.")
def cache_recovery(
    cache_block: str,
    incident_detected_at: datetime,
    warmup_window_seconds: float = 300,
    sample_interval_seconds: float = 10,
    target_hit_rate: float = 0.8,
    min_keys: int = 1,
    stop_when_warm: bool = True,
    approval_policy: CachePolicy = "required",
    allowed_approvers: list[str] | None = None,
    approval_timeout_seconds: int = 1800,
    approval_poll_seconds: float = 5,
    dry_run: bool = False,
    drill: bool = False,
    objectives_block: str = "default",
    business_function: str = "cache",
    lock_wait_seconds: int = 30,
) -> State:
    """Flush a corrupted cache database and report how it warms up again.

    Args:
        cache_block: name of the RedisCache block (its ``db`` is the only database flushed).
        incident_detected_at: when the corruption was detected (tz-aware); the RTO counts from it.
        warmup_window_seconds: longest time to watch the warm-up.
        sample_interval_seconds: time between two samples of key count and hit rate.
        target_hit_rate: hit rate at which the cache counts as warm.
        min_keys: key count at which the cache counts as repopulated.
        stop_when_warm: stop watching as soon as both thresholds are met.
        approval_policy: 'required' (a named approver), 'none' (the operator's trigger is the decision;
            the cache is ephemeral; refused for a production cache) or 'auto' (drills only).
        allowed_approvers: who may approve the flush.
        approval_timeout_seconds: how long to wait for approval before giving up without flushing.
        approval_poll_seconds: how often a paused run checks for an answer.
        dry_run: record the plan and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        lock_wait_seconds: how long to wait for another recovery of the same cache to finish.
    """
    approvers = list(allowed_approvers or [])
    started = utcnow()
    report = RecoveryReport(
        scenario=SCENARIO, incident_id="unassigned", target=cache_block, severity="P3",
        flow_run_id=str(runtime.flow_run.id) if runtime.flow_run.id else None, drill=drill, dry_run=dry_run,
        incident_detected_at=incident_detected_at, started_at=started, recovery_target="empty cache, repopulated",
        rto_objective_seconds=0, rpo_objective_seconds=0,
    )
    try:
        with report.step("Preflight: validate inputs") as step:
            check_parameters()
            _refuse_bad_input(incident_detected_at, started, warmup_window_seconds, sample_interval_seconds,
                              approval_policy, approvers, approval_timeout_seconds, drill, target_hit_rate)
            objectives = load_block(RecoveryObjectives, objectives_block,
                                    default=RecoveryObjectives() if objectives_block == "default" else None)
            objective = objectives.for_function(business_function)
            report.rto_objective_seconds, report.rpo_objective_seconds = objective.rto_seconds, objective.rpo_seconds
            cache = load_block(RedisCache, cache_block)
            if approval_policy == "auto" and cache.environment == "production":
                raise InvalidInput(f"approval policy 'auto' is refused for {cache_block!r}: its environment is production")
            if approval_policy == "none" and cache.environment == "production":
                raise InvalidInput(f"approval policy 'none' is refused for {cache_block!r}: its environment is "
                                   "production; use 'required' with named approvers")
            if not ping_cache(cache):
                raise InvalidInput(f"cache {cache_block!r} at {cache.address} does not answer PING")
            report.incident_id = _incident_key(cache_block, incident_detected_at)
            step.detail = f"{cache.address}; incident {report.incident_id}"

        with recovery_lock(cache_block, lock_wait_seconds, runtime.flow_run.id):
            return _recover(cache, report, approval_policy, approvers, approval_timeout_seconds, approval_poll_seconds,
                            dry_run, warmup_window_seconds, sample_interval_seconds, target_hit_rate, min_keys,
                            stop_when_warm)
    except BaseException as exc:
        report.outcome = report.outcome_for(exc)
        report.summary = report.summary or f"The recovery stopped: {exc}"
        raise
    finally:
        report.ended_at = utcnow()
        publish_evidence(report)


def _recover(cache: RedisCache, report: RecoveryReport, approval_policy: str, approvers: list[str],
             approval_timeout_seconds: int, approval_poll_seconds: float, dry_run: bool, window: float,
             interval: float, target_hit_rate: float, min_keys: int, stop_when_warm: bool) -> State:
    with report.step("Inspect the cache") as step:
        info = inspect_cache(cache)
        before = sample_cache_stats(cache)
        latency_before = measure_cache_latency(cache)
        report.facts["Keyspace before flush"] = f"{before.dbsize} keys in db {cache.db} ({info.get('keyspace')})"
        report.facts["Server"] = f"Redis {info.get('redis_version')}, role {info.get('role')}, memory {info.get('used_memory_human')}"
        report.facts["Latency before flush"] = f"p50 {latency_before.p50_ms} ms, p95 {latency_before.p95_ms} ms"
        step.detail = f"{before.dbsize} keys; p95 latency {latency_before.p95_ms} ms"

    report.plan = [
        f"FLUSHDB on {cache.address}: {before.dbsize} keys -> 0 keys (other databases untouched)",
        f"watch the warm-up for at most {window:g} s, a sample every {interval:g} s, until {min_keys} keys and a "
        f"hit rate of {target_hit_rate:.0%}",
    ]
    if dry_run:
        report.outcome = "DryRun"
        report.summary = "Dry run: the plan was recorded and nothing was changed."
        return Completed(name="DryRun", message=report.summary)

    if approval_policy != "none":
        preview = (f"## Flush cache `{report.target}`?\n\n- **Database**: {cache.address}\n"
                   f"- **Keys now**: {before.dbsize}\n- **Latency p95**: {latency_before.p95_ms} ms\n\n"
                   "Approving deletes every key of this one database; applications repopulate it "
                   "from the database of record. Rejecting changes nothing.")
        decision = approval_step(report, approval_policy, preview, approvers, approval_timeout_seconds,
                                 approval_poll_seconds)
        if decision is None or not decision.approved:
            name = "ApprovalTimedOut" if decision is None else "Rejected"
            report.outcome = name
            report.summary = f"The flush was {'not approved in time' if decision is None else 'rejected'}; nothing changed."
            get_run_logger().warning(report.summary)
            return Failed(name=name, message=report.summary) if decision is None else Cancelled(name=name, message=report.summary)

    with report.step("Flush the affected database") as step:
        removed = flush_cache_db(cache)
        step.detail = f"FLUSHDB on {cache.address}: {removed} keys removed"
    flushed_at = utcnow()
    report.rpo_seconds = 0.0  # the cache holds no data of record

    samples: list[dict] = []
    with report.step("Watch the warm-up") as step:
        deadline = time.monotonic() + window
        previous = sample_cache_stats(cache)
        warm, warm_at = False, None
        while time.monotonic() < deadline:
            time.sleep(min(interval, max(deadline - time.monotonic(), 0)))
            current = sample_cache_stats(cache)
            rate = hit_rate(previous, current)
            samples.append({"at": current.at.isoformat(), "keys": current.dbsize, "hit_rate": rate,
                            "reset": counters_reset(previous, current)})
            previous = current
            warm = current.dbsize >= min_keys and rate is not None and rate >= target_hit_rate
            if warm and warm_at is None:
                warm_at = current.at
            if warm and stop_when_warm:
                break
        latency_after = measure_cache_latency(cache)
        step.detail = (f"{len(samples)} samples; {previous.dbsize} keys; last hit rate "
                       f"{samples[-1]['hit_rate'] if samples else '-'}; p95 latency {latency_after.p95_ms} ms")

    last_rate = samples[-1]["hit_rate"] if samples else None
    report.facts["Warm-up samples (time, keys, hit rate)"] = [
        f"{s['at'][11:19]} {s['keys']} keys {_percent(s['hit_rate'], s['reset'])}" for s in samples
    ]
    report.facts["Hit rate scope"] = (f"server-wide: keyspace hits and misses of every database of "
                                      f"{cache.host}:{cache.port}, not only db {cache.db}")
    if any(s["reset"] for s in samples):
        report.facts["Counter resets"] = (f"{sum(s['reset'] for s in samples)} intervals without a hit rate: the "
                                          "server's counters went backwards (CONFIG RESETSTAT or a restart)")
    report.facts["Warm after"] = (f"{(warm_at - flushed_at).total_seconds():.1f} s from the flush"
                                  if warm_at else f"not warm within {window:g} s")
    report.service_restored_at = warm_at or flushed_at
    report.rto_seconds = (report.service_restored_at - report.incident_detected_at).total_seconds()
    report.facts["RTO counted to"] = ("the first warm sample (enough keys and the target hit rate)" if warm_at else
                                      f"the flush: the cache was not warm within {window:g} s, so the RTO is a "
                                      "lower bound")
    report.facts["Latency after warm-up"] = f"p50 {latency_after.p50_ms} ms, p95 {latency_after.p95_ms} ms"
    report.add_checks("warm-up", [
        CheckResult("cache answers", ping_cache(cache), f"PING {cache.address}"),
        CheckResult("keys repopulated", previous.dbsize >= min_keys, f"{previous.dbsize} keys (want >= {min_keys})",
                    critical=False),
        CheckResult("hit rate recovered", last_rate is not None and last_rate >= target_hit_rate,
                    f"last interval {last_rate if last_rate is not None else 'no lookups'} (want >= {target_hit_rate})",
                    critical=False),
    ])
    if report.failed_critical():
        report.outcome = "PostCheckFailed"
        report.summary = f"The cache {report.target} was flushed but does not answer afterwards."
        return Failed(name="PostCheckFailed", message=report.summary)
    if not warm:
        report.action_items.append(f"the cache was not warm after {window:g} s: check that applications repopulate it")
    report.outcome = "Recovered"
    report.summary = (f"Database {cache.db} of {cache.address} was flushed ({removed} keys) and "
                      f"{'warmed up' if warm else 'is warming up'}: {previous.dbsize} keys, last hit rate "
                      f"{last_rate if last_rate is not None else 'n/a'}.")
    return Completed(name="Recovered", message=report.summary)
