"""Tasks over a RedisCache: thin, verb-first wrappers of the block's verbs."""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.redis_cache import CacheStats, Latency, RedisCache
from tasks._policy import policy


@task(name="ping-cache", **policy(timeout_seconds=60))
def ping_cache(cache: RedisCache) -> bool:
    """Whether the cache answers PING (False when it cannot be reached)."""
    return cache.is_reachable()


@task(name="inspect-cache", **policy(timeout_seconds=60))
def inspect_cache(cache: RedisCache) -> dict:
    """Server version, role, memory and this database's keyspace."""
    return cache.info()


@task(name="sample-cache-stats", **policy(timeout_seconds=60))
def sample_cache_stats(cache: RedisCache) -> CacheStats:
    """Key count of the database and the server's hit and miss counters."""
    return cache.stats()


@task(name="measure-cache-latency", **policy(timeout_seconds=60))
def measure_cache_latency(cache: RedisCache, samples: int = 20) -> Latency:
    """Round-trip time of sampled PING commands."""
    return cache.latency(samples)


@task(name="flush-cache-db", **policy(timeout_seconds=120))
def flush_cache_db(cache: RedisCache) -> int:
    """FLUSHDB on the cache's one database; returns how many keys it held."""
    removed = cache.flush_db()
    get_run_logger().info("Flushed %s: %d keys removed", cache.address, removed)
    return removed
