"""A two-region estate: the regions, their DNS zone, database and workloads, and how its workloads move.

Shared by the regional failover and the regional failback. :func:`load_estate` loads and
cross-checks every block before anything changes; workloads are scaled one tier at a time, tier 1
first, each tier ready before the next.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocks import PostgresCluster
from blocks.dns import DnsZone
from blocks.errors import InvalidInput
from blocks.kubernetes import KubernetesTarget
from blocks.loading import load_block
from blocks.rds import RdsDatabase
from blocks.region import Region
from runbook.failover import dsn_for
from runbook.run import Recovery
from tasks.kubernetes import read_replicas, scale_deployment, wait_for_rollout

# (tier, deployment, current replicas, wanted replicas)
ScaleRow = tuple[int, str, int, int]


@dataclass
class TwoRegionEstate:
    """The blocks of a two-region estate, loaded and checked before anything changes."""

    primary: Region
    dr: Region
    zone: DnsZone
    zone_block: str
    cluster: PostgresCluster | None
    cluster_block: str | None
    rds: RdsDatabase | None
    primary_kube: KubernetesTarget | None
    dr_kube: KubernetesTarget | None

    @property
    def journal_scope(self) -> str:
        """Where a promotion or switch of this estate is journalled."""
        return f"estate-{self.zone_block}"

    @property
    def lock_targets(self) -> list[str]:
        """One failover or failback per estate, and per database, at a time: the estate's lock first."""
        return [f"estate-{self.zone_block}"] + ([self.cluster_block] if self.cluster_block else [])

    def dsn(self, region: Region) -> str:
        """The DSN applications use for the database instance of ``region``."""
        if self.cluster is not None:
            return dsn_for(self.cluster, region.postgres_port, region.database_host)
        return f"rds:{self.rds.replica_identifier if region.rds_role == 'replica' else self.rds.instance_identifier}"


def load_estate(primary_region: str, dr_region: str, dns_zone: str, dns_ttl_seconds: int | None = None) -> TwoRegionEstate:
    """Load and cross-check every block of the estate; refuses bad input before any change."""
    if not primary_region or not dr_region or primary_region.strip() == dr_region.strip():
        raise InvalidInput(f"the primary and the DR region are the same block {primary_region!r}")
    if dns_ttl_seconds is not None and dns_ttl_seconds <= 0:
        raise InvalidInput(f"DNS TTL {dns_ttl_seconds} s must be a positive number of seconds")
    primary = load_block(Region, primary_region)
    dr = load_block(Region, dr_region)
    primary.check_pair(dr)
    zone = load_block(DnsZone, dns_zone)
    if dns_ttl_seconds is not None:
        zone = zone.model_copy(update={"ttl": dns_ttl_seconds})
    if (primary.dns_target, dr.dns_target) != (zone.primary_target, zone.secondary_target):
        raise InvalidInput(
            f"DNS zone {dns_zone!r} moves between {zone.primary_target!r} and {zone.secondary_target!r}, but the regions "
            f"say {primary.dns_target!r} (primary) and {dr.dns_target!r} (DR)")
    cluster = rds = None
    if primary.postgres_cluster:
        cluster = load_block(PostgresCluster, primary.postgres_cluster)
        cluster.instance_at(primary.postgres_port)
        cluster.instance_at(dr.postgres_port)
    else:
        rds = load_block(RdsDatabase, primary.rds_database)
    kubes = []
    for region in (primary, dr):
        kube = load_block(KubernetesTarget, region.kubernetes_target) if region.kubernetes_target else None
        if kube is not None:
            for name in kube.deployments:
                read_replicas(kube, name)  # a missing deployment is refused here, before any change
            if region.database_secret and not kube.deployments:
                raise InvalidInput(f"region {region.name!r} has a database secret but no deployments to use it")
        kubes.append(kube)
    if dr.database_secret and kubes[1] is None:
        raise InvalidInput(f"region {dr.name!r} names database_secret {dr.database_secret!r} without a kubernetes_target")
    primary.health()
    dr.health()
    return TwoRegionEstate(primary, dr, zone, dns_zone, cluster, primary.postgres_cluster, rds, kubes[0], kubes[1])


def scale_plan(kube: KubernetesTarget | None, region: Region, to: str) -> list[ScaleRow]:
    """(tier, deployment, current, wanted) for every declared deployment of ``region``, tier 1 first.

    ``to`` is 'declared' (the counts the region runs at when serving) or 'standby' (its standby count).
    """
    if kube is None:
        return []
    rows = []
    for tier_number, tier in enumerate(region.tier_order(list(kube.deployments)), 1):
        for name in tier:
            wanted = kube.deployments[name] if to == "declared" else region.standby_replicas
            rows.append((tier_number, name, read_replicas(kube, name).spec, wanted))
    return rows


def scale_in_tiers(run: Recovery, kube: KubernetesTarget | None, rows: list[ScaleRow], label: str,
                   timeout_seconds: float) -> None:
    """Scale each tier, and wait until it is ready before the next one (one recorded step per tier)."""
    if kube is None:
        return
    for tier_number in sorted({r[0] for r in rows}):
        tier = [r for r in rows if r[0] == tier_number]
        with run.step(f"{label}: tier {tier_number}") as step:
            for _, name, _, wanted in tier:
                scale_deployment(kube, name, wanted)
            for _, name, _, wanted in tier:
                if wanted > 0:
                    wait_for_rollout(kube, name, timeout_seconds)
            step.detail = ", ".join(f"{name} {current} -> {wanted}" for _, name, current, wanted in tier)
