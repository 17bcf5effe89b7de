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
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from prefect.states import State

from blocks import CheckResult
from blocks.errors import InvalidInput
from blocks.loading import load_block
from blocks.redis_cache import CacheStats, RedisCache
from runbook.evidence import utcnow
from runbook.parameters import recovery_flow
from runbook.run import Approval, Recovery
from tasks.redis import flush_cache_db, inspect_cache, measure_cache_latency, ping_cache, sample_cache_stats

SCENARIO = "cache"
CachePolicy = Literal["required", "none", "auto"]
CACHE_POLICIES = ("required", "none", "auto")


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


@dataclass(frozen=True)
class WarmUp:
    """How the warm-up is watched, and when the cache counts as warm."""

    window: float
    interval: float
    target_hit_rate: float
    min_keys: int = 1
    stop_when_warm: bool = True

    def check(self) -> None:
        """Refuse a watch that could not measure anything, naming the values."""
        if not 0 < self.interval <= self.window <= 3600:
            raise InvalidInput(f"warm-up window {self.window} s and sample interval {self.interval} s: expected "
                               "0 < interval <= window <= 3600")
        if not 0 <= self.target_hit_rate <= 1:
            raise InvalidInput(f"target hit rate {self.target_hit_rate} is not between 0 and 1")

    def is_warm(self, keys: int, rate: float | None) -> bool:
        return keys >= self.min_keys and rate is not None and rate >= self.target_hit_rate


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
    severity: str | None = None,
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
        severity: P0 (outage or data loss) to P3, or Sev1-Sev4; empty takes the scenario's default. Decides
            who is told, how often updates go out, and who is paged when an approval waits.
        dry_run: record the plan and change nothing.
        drill: this run is a drill (the only case where 'auto' approval is allowed).
        objectives_block: name of the RecoveryObjectives block (built-in defaults when 'default' is absent).
        business_function: which objective applies.
        lock_wait_seconds: how long to wait for another recovery of the same cache to finish.
    """
    warmup = WarmUp(warmup_window_seconds, sample_interval_seconds, target_hit_rate, min_keys, stop_when_warm)
    run = Recovery(
        SCENARIO, target=cache_block, severity=severity, detected_at=incident_detected_at,
        recovery_target="empty cache, repopulated",
        approval=Approval.of(approval_policy, allowed_approvers, approval_timeout_seconds, approval_poll_seconds,
                             allowed_policies=CACHE_POLICIES),
        drill=drill, dry_run=dry_run, objectives_block=objectives_block, business_function=business_function,
    )
    report = run.report
    with run:
        # 1. Preflight: the watch can measure something, 'none' and 'auto' stay off production, the cache answers.
        with run.preflight() as step:
            warmup.check()
            cache = load_block(RedisCache, cache_block)
            run.refuse_unsafe_policy(cache_block, cache.environment)
            if not ping_cache(cache):
                raise InvalidInput(f"cache {cache_block!r} at {cache.address} does not answer PING")
            run.assign_incident(None, cache_block)
            step.detail = f"{cache.address}; incident {run.incident_id}"

        with run.locks(cache_block, wait_seconds=lock_wait_seconds):
            # 1. Record the keyspace, the hit counters and the latency before the flush.
            with run.step("Inspect the cache") as step:
                info = inspect_cache(cache)
                before = sample_cache_stats(cache)
                latency_before = measure_cache_latency(cache)
                report.facts["Keyspace before flush"] = f"{before.dbsize} keys in db {cache.db} ({info.get('keyspace')})"
                report.facts["Server"] = (f"Redis {info.get('redis_version')}, role {info.get('role')}, "
                                          f"memory {info.get('used_memory_human')}")
                report.facts["Latency before flush"] = f"p50 {latency_before.p50_ms} ms, p95 {latency_before.p95_ms} ms"
                step.detail = f"{before.dbsize} keys; p95 latency {latency_before.p95_ms} ms"
            plan = [
                f"FLUSHDB on {cache.address}: {before.dbsize} keys -> 0 keys (other databases untouched)",
                f"watch the warm-up for at most {warmup.window:g} s, a sample every {warmup.interval:g} s, until "
                f"{warmup.min_keys} keys and a hit rate of {warmup.target_hit_rate:.0%}",
            ]
            if dry_run:
                return run.planned(plan)
            report.plan = plan

            # 2. Approval ('none': the operator's trigger is the decision, and no approval step is recorded).
            if run.approval.policy != "none":
                decision = run.approve(
                    f"## Flush cache `{report.target}`?\n\n- **Database**: {cache.address}\n"
                    f"- **Keys now**: {before.dbsize}\n- **Latency p95**: {latency_before.p95_ms} ms\n\n"
                    "Approving deletes every key of this one database; applications repopulate it "
                    "from the database of record. Rejecting changes nothing.")
                if decision is None or not decision.approved:
                    return run.declined(decision, "The flush")

            # 3. Flush the affected database only.
            with run.step("Flush the affected database") as step:
                removed = flush_cache_db(cache)
                step.detail = f"FLUSHDB on {cache.address}: {removed} keys removed"
            flushed_at = utcnow()
            report.rpo_seconds = 0.0  # the cache holds no data of record

            # 4. Applications repopulate the cache: watch key count, hit rate and latency for a bounded window.
            with run.step("Watch the warm-up") as step:
                samples, last, warm_at = _watch(cache, warmup)
                latency_after = measure_cache_latency(cache)
                step.detail = (f"{len(samples)} samples; {last.dbsize} keys; last hit rate "
                               f"{samples[-1]['hit_rate'] if samples else '-'}; p95 latency {latency_after.p95_ms} ms")

            # 5. The report: the warm-up curve, the latency before and after.
            warm = bool(samples) and samples[-1]["warm"]
            last_rate = samples[-1]["hit_rate"] if samples else None
            _record_warmup(run, cache, warmup, samples, flushed_at, warm_at)
            report.facts["Latency after warm-up"] = f"p50 {latency_after.p50_ms} ms, p95 {latency_after.p95_ms} ms"
            report.add_checks("warm-up", [
                CheckResult("cache answers", ping_cache(cache), f"PING {cache.address}"),
                CheckResult("keys repopulated", last.dbsize >= warmup.min_keys,
                            f"{last.dbsize} keys (want >= {warmup.min_keys})", critical=False),
                CheckResult("hit rate recovered", last_rate is not None and last_rate >= warmup.target_hit_rate,
                            f"last interval {last_rate if last_rate is not None else 'no lookups'} "
                            f"(want >= {warmup.target_hit_rate})", critical=False),
            ])
            if report.failed_critical():
                return run.finish("PostCheckFailed", f"The cache {report.target} was flushed but does not answer "
                                  "afterwards.")
            if not warm:
                report.action_items.append(f"the cache was not warm after {warmup.window:g} s: check that "
                                           "applications repopulate it")
            return run.finish("Recovered", f"Database {cache.db} of {cache.address} was flushed ({removed} keys) and "
                              f"{'warmed up' if warm else 'is warming up'}: {last.dbsize} keys, last hit rate "
                              f"{last_rate if last_rate is not None else 'n/a'}.")


def _watch(cache: RedisCache, warmup: WarmUp) -> tuple[list[dict], CacheStats, datetime | None]:
    """Sample the cache every interval until the window ends (or it is warm); the samples, the last stats, warm at."""
    samples: list[dict] = []
    deadline = time.monotonic() + warmup.window
    previous, warm_at = sample_cache_stats(cache), None
    while time.monotonic() < deadline:
        time.sleep(min(warmup.interval, max(deadline - time.monotonic(), 0)))
        current = sample_cache_stats(cache)
        rate = hit_rate(previous, current)
        warm = warmup.is_warm(current.dbsize, rate)
        samples.append({"at": current.at.isoformat(), "keys": current.dbsize, "hit_rate": rate,
                        "reset": counters_reset(previous, current), "warm": warm})
        previous = current
        if warm and warm_at is None:
            warm_at = current.at
        if warm and warmup.stop_when_warm:
            break
    return samples, previous, warm_at


def _record_warmup(run: Recovery, cache: RedisCache, warmup: WarmUp, samples: list[dict], flushed_at: datetime,
                   warm_at: datetime | None) -> None:
    """The warm-up curve and the RTO: service counts as restored at the first warm sample, else at the flush."""
    facts = run.report.facts
    facts["Warm-up samples (time, keys, hit rate)"] = [
        f"{s['at'][11:19]} {s['keys']} keys {_percent(s['hit_rate'], s['reset'])}" for s in samples
    ]
    facts["Hit rate scope"] = (f"server-wide: keyspace hits and misses of every database of "
                               f"{cache.host}:{cache.port}, not only db {cache.db}")
    if any(s["reset"] for s in samples):
        facts["Counter resets"] = (f"{sum(s['reset'] for s in samples)} intervals without a hit rate: the "
                                   "server's counters went backwards (CONFIG RESETSTAT or a restart)")
    facts["Warm after"] = (f"{(warm_at - flushed_at).total_seconds():.1f} s from the flush"
                           if warm_at else f"not warm within {warmup.window:g} s")
    run.mark_restored(warm_at or flushed_at)
    facts["RTO counted to"] = ("the first warm sample (enough keys and the target hit rate)" if warm_at else
                               f"the flush: the cache was not warm within {warmup.window:g} s, so the RTO is a "
                               "lower bound")
