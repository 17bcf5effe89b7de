"""Cache recovery against a real redis-server: flush one database, watch applications warm it up."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import redis

from blocks.errors import InvalidInput
from blocks.redis_cache import RedisCache
from runbook.evidence import load_report


def _fill(url: str, db: int, count: int) -> None:
    client = redis.Redis.from_url(f"{url}/{db}")
    client.mset({f"k{i}": "v" for i in range(count)})


class App(threading.Thread):
    """A cache-aside reader: GET each key, SET it on a miss, over a working set of ``keys`` keys."""

    def __init__(self, url: str, db: int, keys: int = 200):
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(f"{url}/{db}")
        self.keys = keys
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            key = f"user:{i % self.keys}"
            if self.client.get(key) is None:
                self.client.set(key, "profile")
            i += 1


def test_block_flushes_only_its_database_and_reports_counters(redis_server):
    cache = RedisCache.from_url(f"{redis_server}/3")
    _fill(redis_server, 3, 50)
    _fill(redis_server, 4, 7)
    client = redis.Redis.from_url(f"{redis_server}/3")
    client.get("k1"), client.get("missing")
    stats = cache.stats()
    assert stats.dbsize == 50 and stats.keyspace_hits >= 1 and stats.keyspace_misses >= 1
    assert cache.info()["keyspace"]["keys"] == 50
    assert cache.flush_db() == 50
    assert cache.stats().dbsize == 0
    assert redis.Redis.from_url(f"{redis_server}/4").dbsize() == 7
    latency = cache.latency(5)
    assert latency.samples == 5 and 0 < latency.p50_ms <= latency.max_ms


def test_block_refuses_bad_url_and_reports_unreachable():
    with pytest.raises(InvalidInput, match="not redis://"):
        RedisCache.from_url("http://127.0.0.1:1/0")
    with pytest.raises(InvalidInput, match="not a number"):
        RedisCache.from_url("redis://127.0.0.1:6379/abc")
    from sandbox.paths import free_port

    assert not RedisCache(port=free_port(), connect_timeout_seconds=0.5).is_reachable()


def test_flush_and_warm_up_is_sampled_while_an_app_repopulates(redis_cache, redis_server):
    from flows.cache_recovery import cache_recovery

    name, cache = redis_cache
    _fill(redis_server, 3, 300)
    _fill(redis_server, 5, 9)
    app = App(redis_server, 3)
    detected = datetime.now(timezone.utc)
    app.start()
    try:
        state = cache_recovery(cache_block=name, incident_detected_at=detected, warmup_window_seconds=4,
                               sample_interval_seconds=0.5, target_hit_rate=0.9, min_keys=200,
                               approval_policy="none", return_state=True)
    finally:
        app.stop.set()
        app.join(5)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "Recovered", report.summary
    assert report.outcome == "Recovered" and report.rto_seconds is not None and report.rto_met
    flushed = next(s.detail for s in report.steps if s.step == "Flush the affected database")
    assert 300 <= int(flushed.split(": ")[1].split()[0]) <= 500  # the corrupted keys plus what the app wrote
    samples = report.facts["Warm-up samples (time, keys, hit rate)"]
    assert 1 <= len(samples) <= 8
    assert "200 keys" in samples[-1]
    assert {c.name: c.passed for c in report.checks} == {"cache answers": True, "keys repopulated": True,
                                                         "hit rate recovered": True}
    assert report.facts["RTO counted to"].startswith("the first warm sample")
    flush_end = next(s.end for s in report.steps if s.step == "Flush the affected database")
    assert report.service_restored_at > flush_end
    assert report.facts["Hit rate scope"].startswith("server-wide")
    assert redis.Redis.from_url(f"{redis_server}/5").dbsize() == 9
    assert not any(k.startswith("k") for k in redis.Redis.from_url(f"{redis_server}/3", decode_responses=True).keys())


def test_dry_run_lists_the_flush_and_changes_nothing(redis_cache, redis_server):
    from flows.cache_recovery import cache_recovery

    name, _ = redis_cache
    _fill(redis_server, 3, 40)
    state = cache_recovery(cache_block=name, incident_detected_at=datetime.now(timezone.utc), dry_run=True,
                           allowed_approvers=["alice"], return_state=True)
    report = load_report(state.state_details.flow_run_id)
    assert state.name == "DryRun"
    assert report.plan[0].endswith("40 keys -> 0 keys (other databases untouched)")
    assert redis.Redis.from_url(f"{redis_server}/3").dbsize() == 40


def test_inputs_are_checked_without_a_server():
    from flows.cache_recovery import CACHE_POLICIES, WarmUp
    from runbook.run import Approval, refuse_future, require_aware

    def _refuse_bad_input(detected, started, window, interval, policy, approvers, approval_timeout, drill,
                          target_hit_rate):
        """The cache flow's preflight checks, in their order."""
        require_aware("incident_detected_at", detected)
        refuse_future("incident_detected_at", detected, started)
        Approval.of(policy, approvers, approval_timeout, allowed_policies=CACHE_POLICIES).check(drill)
        WarmUp(window, interval, target_hit_rate).check()

    now = datetime.now(timezone.utc)
    good = dict(detected=now, started=now, window=60, interval=5, policy="none", approvers=[], approval_timeout=60,
                drill=False, target_hit_rate=0.8)
    _refuse_bad_input(**good)
    for change, message in [
        ({"detected": datetime.now()}, "no time zone"),
        ({"detected": now + timedelta(hours=1)}, "in the future"),
        ({"window": 1, "interval": 5}, "expected 0 < interval <= window"),
        ({"target_hit_rate": 1.5}, "not between 0 and 1"),
        ({"policy": "sometimes"}, "is not one of 'required', 'none', 'auto'"),
        ({"policy": "required"}, "at least one name"),
        ({"policy": "auto"}, "only for drills"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            _refuse_bad_input(**(good | change))


@pytest.mark.parametrize("kwargs, message", [
    ({"incident_detected_at": datetime.now()}, "no time zone"),
])
def test_bad_inputs_are_refused_before_the_flush(redis_cache, redis_server, kwargs, message):
    from flows.cache_recovery import cache_recovery

    name, _ = redis_cache
    _fill(redis_server, 3, 12)
    params = {"cache_block": name, "incident_detected_at": datetime.now(timezone.utc), "approval_policy": "none",
              **kwargs}
    state = cache_recovery(**params, return_state=True)
    assert state.is_failed()
    with pytest.raises(InvalidInput, match=message):
        state.result()
    assert load_report(state.state_details.flow_run_id).outcome == "Refused"
    assert redis.Redis.from_url(f"{redis_server}/3").dbsize() == 12


def test_a_production_cache_is_never_flushed_without_approval(redis_server, prefect_api):
    import uuid

    from flows.cache_recovery import cache_recovery

    name = f"cache-prod-{uuid.uuid4().hex[:8]}"
    cache = RedisCache.from_url(f"{redis_server}/3")
    assert cache.environment == "production"
    cache.save(name)
    _fill(redis_server, 3, 12)
    state = cache_recovery(cache_block=name, incident_detected_at=datetime.now(timezone.utc),
                           approval_policy="none", return_state=True)
    assert state.is_failed()
    with pytest.raises(InvalidInput, match="'none' is refused .* production"):
        state.result()
    assert load_report(state.state_details.flow_run_id).outcome == "Refused"
    assert redis.Redis.from_url(f"{redis_server}/3").dbsize() == 12


def test_hit_rate_has_no_value_across_a_counter_reset(redis_server):
    from flows.cache_recovery import counters_reset, hit_rate

    cache = RedisCache.from_url(f"{redis_server}/3")
    client = redis.Redis.from_url(f"{redis_server}/3")
    client.set("a", "1")
    for _ in range(5):
        client.get("a")
    before = cache.stats()
    client.config_resetstat()
    client.get("a")
    after = cache.stats()
    assert counters_reset(before, after) and hit_rate(before, after) is None
    client.get("a"), client.get("missing")
    later = cache.stats()
    assert not counters_reset(after, later) and hit_rate(after, later) == 0.5
