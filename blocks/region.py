"""A region of a two-region estate: which database instance, Kubernetes cluster and health endpoints live there."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, model_validator

from blocks.errors import InvalidInput
from blocks.health import HealthEndpoints

# Service Recovery Priorities of the continuity plans: tier 1 immediately, tier 2 within an hour,
# tier 3 within four hours. Deployments are scaled up in this order during a failover.
DEFAULT_TIERS: list[list[str]] = [
    ["auth", "core-api"],
    ["dashboard", "notifications", "billing"],
    ["ai-services", "analytics", "admin"],
]


class Region(Block):
    """What runs in one region, by block name, so a failover flow can act on it.

    Example:
        ```python
        from blocks.region import Region
        dr = Region.load("dr")
        dr.tier_order(["core-api", "auth", "admin"])   # [["auth", "core-api"], ["admin"]]
        ```
    """

    _block_type_name = "Region"
    _block_type_slug = "dr-region"
    _description = "One region of a two-region estate: its database instance, Kubernetes cluster, health endpoints and DNS target."

    name: str = Field(min_length=1, description="Region name, e.g. eu-west-1.")
    postgres_cluster: str | None = Field(
        default=None, description="Name of the PostgresCluster block whose instance in this region is listed below.")
    postgres_port: int | None = Field(
        default=None, ge=1, le=65535, description="Port of that cluster's instance that runs in this region.")
    rds_database: str | None = Field(
        default=None, description="Name of the RdsDatabase block, for an estate on RDS instead of PostgresCluster.")
    rds_role: str = Field(
        default="primary", pattern="^(primary|replica)$",
        description="Which instance of the RdsDatabase lives here: 'primary' or 'replica'.")
    kubernetes_target: str | None = Field(
        default=None, description="Name of the KubernetesTarget block of this region's cluster and namespace.")
    health_endpoints: dict[str, str] = Field(
        default_factory=dict, description="Health endpoints of this region's services: name -> URL.")
    health_timeout_seconds: float = Field(default=5, gt=0, description="Upper bound of one health probe.")
    dns_target: str = Field(min_length=1, description="Value the DNS records hold while this region serves.")
    tiers: list[list[str]] = Field(
        default_factory=lambda: [list(t) for t in DEFAULT_TIERS],
        description="Deployment names by recovery tier, tier 1 first; scaled in this order during a failover.")
    standby_replicas: int = Field(
        default=0, ge=0, description="Replicas each deployment keeps while this region is the standby.")
    database_secret: str | None = Field(
        default=None, description="Kubernetes Secret holding the applications' database DSN in this region.")
    database_secret_key: str = Field(default="DATABASE_URL", description="Key of the DSN inside that Secret.")
    database_host: str | None = Field(
        default=None, description="Host applications use for this region's database (defaults to the instance's host).")

    @model_validator(mode="after")
    def _one_database(self) -> Region:
        if bool(self.postgres_cluster) == bool(self.rds_database):
            raise ValueError("set exactly one of postgres_cluster (with postgres_port) or rds_database")
        if self.postgres_cluster and self.postgres_port is None:
            raise ValueError("postgres_port is needed with postgres_cluster")
        return self

    def health(self) -> HealthEndpoints:
        """This region's health endpoints as a probe-able block."""
        if not self.health_endpoints:
            raise InvalidInput(f"region {self.name!r} lists no health endpoints")
        return HealthEndpoints(endpoints=dict(self.health_endpoints), region=self.name,
                               timeout_seconds=self.health_timeout_seconds)

    def tier_order(self, deployments: list[str]) -> list[list[str]]:
        """``deployments`` grouped by tier, tier 1 first; those in no tier come last, as one group."""
        known = set(deployments)
        order = [[d for d in tier if d in known] for tier in self.tiers]
        placed = {d for tier in order for d in tier}
        rest = sorted(known - placed)
        return [tier for tier in order if tier] + ([rest] if rest else [])

    def check_pair(self, other: Region) -> None:
        """Refuse a pair of regions a failover cannot run between."""
        if self.name == other.name:
            raise InvalidInput(f"the primary and the DR region are the same region {self.name!r}")
        if self.dns_target == other.dns_target:
            raise InvalidInput(f"regions {self.name!r} and {other.name!r} share the DNS target {self.dns_target!r}")
        if (self.postgres_cluster, self.rds_database) != (other.postgres_cluster, other.rds_database):
            raise InvalidInput(f"regions {self.name!r} and {other.name!r} describe different databases")
        if self.postgres_cluster and self.postgres_port == other.postgres_port:
            raise InvalidInput(f"regions {self.name!r} and {other.name!r} name the same instance (port {self.postgres_port})")
        if self.rds_database and self.rds_role == other.rds_role:
            raise InvalidInput(f"regions {self.name!r} and {other.name!r} both hold the RDS {self.rds_role}")
