"""Tasks over a DnsZone: thin, verb-first wrappers of the block's verbs."""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.dns import DnsCutover, DnsZone
from tasks._policy import policy


@task(name="read-dns-targets", **policy(timeout_seconds=60))
def read_dns_targets(zone: DnsZone) -> dict[str, list[str]]:
    """What each managed record holds now."""
    return zone.current_targets()


@task(name="check-dns-zone", **policy(timeout_seconds=60))
def check_dns_zone(zone: DnsZone) -> str:
    """The hosted zone's name; refuses a zone Route53 does not know."""
    return zone.check_zone()


@task(name="plan-dns-cutover", **policy(timeout_seconds=60))
def plan_dns_cutover(zone: DnsZone, target: str) -> list[str]:
    """The record changes a cutover to ``target`` would make (current -> new)."""
    return zone.plan(target)


@task(name="cutover-dns", **policy(timeout_seconds=900))
def cutover_dns(zone: DnsZone, target: str, comment: str = "") -> DnsCutover:
    """UPSERT every record to ``target`` and wait until INSYNC; no change when already pointing there."""
    result = zone.cutover(target, comment)
    get_run_logger().info("DNS now points at %s (change %s, already: %s)", target, result.change_id, result.already_pointing)
    return result
