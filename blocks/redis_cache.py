"""A Redis database used as a cache, and the verbs a cache recovery needs: inspect, flush one database, watch."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, PrivateAttr, SecretStr

from blocks.errors import InvalidInput, RecoveryError


class RedisError(RecoveryError):
    """Redis refused or failed an operation."""


class RedisUnavailable(RedisError):
    """Redis could not be reached or timed out; may succeed on a retry."""

    transient = True


@dataclass(frozen=True)
class CacheStats:
    """One sample of a cache database: its size and the server's hit counters."""

    at: datetime
    dbsize: int
    keyspace_hits: int
    keyspace_misses: int

    def as_dict(self) -> dict:
        return {**asdict(self), "at": self.at.isoformat()}


@dataclass(frozen=True)
class Latency:
    """Round-trip times of sampled PING commands, in milliseconds."""

    samples: int
    p50_ms: float
    p95_ms: float
    max_ms: float


class RedisCache(Block):
    """One database of a Redis server used as a cache.

    Example:
        ```python
        from blocks.redis_cache import RedisCache

        cache = RedisCache(host="10.0.0.5", port=6379, db=2)
        cache.stats().dbsize
        cache.flush_db()          # FLUSHDB on database 2 only
        ```
    """

    _block_type_name = "Redis Cache"
    _block_type_slug = "redis-cache"
    _description = "A Redis database used as a cache: inspect it, flush it, watch it warm up."

    host: str = Field(default="127.0.0.1", description="Host name or address of the Redis server.")
    port: int = Field(default=6379, ge=1, le=65535, description="TCP port of the Redis server.")
    db: int = Field(default=0, ge=0, le=15, description="The database number this cache uses; flush touches only it.")
    username: str | None = Field(default=None, description="ACL user name; empty for the default user.")
    password: SecretStr | None = Field(default=None, description="Password (AUTH); empty when none is set.")
    ssl: bool = Field(default=False, description="Connect with TLS.")
    socket_timeout_seconds: float = Field(default=5, gt=0, le=120, description="Timeout of each command.")
    connect_timeout_seconds: float = Field(default=5, gt=0, le=120, description="Timeout of each connection attempt.")
    environment: Literal["production", "staging", "sandbox"] = Field(
        default="production", description="What this cache serves; drills with auto approval refuse production."
    )

    _redis: object = PrivateAttr(default=None)

    @classmethod
    def from_url(cls, url: str, **kwargs) -> "RedisCache":
        """A block from ``redis://[user:password@]host:port/db``."""
        from urllib.parse import urlparse

        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise InvalidInput(f"Redis URL {parsed.scheme}://{parsed.hostname or ''}... is not redis://host:port/db")
        db = parsed.path.strip("/") or "0"
        if not db.isdigit():
            raise InvalidInput(f"Redis URL database {db!r} is not a number")
        return cls(host=parsed.hostname, port=parsed.port or 6379, db=int(db), username=parsed.username or None,
                   password=SecretStr(parsed.password) if parsed.password else None, ssl=parsed.scheme == "rediss",
                   **kwargs)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}/{self.db}"

    def _client(self):
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        if self._redis is None:
            # One quick reconnect at most: the task retry policy handles longer outages.
            self._redis = redis.Redis(
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
                host=self.host, port=self.port, db=self.db, username=self.username,
                password=self.password.get_secret_value() if self.password else None, ssl=self.ssl,
                socket_timeout=self.socket_timeout_seconds, socket_connect_timeout=self.connect_timeout_seconds,
                decode_responses=True,
            )
        return self._redis

    def _call(self, what: str, fn, *args):
        import redis

        try:
            return fn(*args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailable(f"{what} on {self.address}: {exc}") from exc
        except redis.RedisError as exc:
            raise RedisError(f"{what} on {self.address}: {exc}") from exc

    def is_reachable(self) -> bool:
        """True when the server answers PING."""
        try:
            return bool(self._call("PING", self._client().ping))
        except RedisError:
            return False

    def info(self) -> dict:
        """Server facts for the evidence: version, role, memory, and this database's keyspace line."""
        info = self._call("INFO", self._client().info)
        keyspace = info.get(f"db{self.db}", {"keys": 0, "expires": 0})
        return {
            "redis_version": info.get("redis_version"), "role": info.get("role"),
            "used_memory_human": info.get("used_memory_human"), "connected_clients": info.get("connected_clients"),
            "keyspace": keyspace,
        }

    def stats(self) -> CacheStats:
        """This database's key count and the server's cumulative hit and miss counters."""
        client = self._client()
        pipe = client.pipeline(transaction=False)
        pipe.dbsize()
        pipe.info("stats")
        dbsize, stats = self._call("DBSIZE/INFO stats", pipe.execute)
        return CacheStats(at=datetime.now(timezone.utc), dbsize=int(dbsize),
                          keyspace_hits=int(stats.get("keyspace_hits", 0)),
                          keyspace_misses=int(stats.get("keyspace_misses", 0)))

    def flush_db(self) -> int:
        """Delete every key of this one database (FLUSHDB; other databases are untouched); returns the keys removed."""
        client = self._client()
        before = int(self._call("DBSIZE", client.dbsize))
        self._call("FLUSHDB", client.flushdb)
        return before

    def latency(self, samples: int = 20) -> Latency:
        """Round-trip time of ``samples`` PING commands."""
        if samples < 1:
            raise InvalidInput(f"latency samples {samples} must be at least 1")
        client = self._client()
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            self._call("PING", client.ping)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
        return Latency(samples=samples, p50_ms=round(statistics.median(times), 3), p95_ms=round(p95, 3),
                       max_ms=round(times[-1], 3))
