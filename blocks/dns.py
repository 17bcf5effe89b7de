"""A Route53 hosted zone whose records send traffic to one of two regions, and the cutover verb."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

from botocore.exceptions import BotoCoreError, ClientError
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator

from blocks._aws import client, error_code, translate
from blocks.errors import InvalidInput, RecoveryError


class DnsError(RecoveryError):
    """Route53 refused or failed a request."""


class DnsUnavailable(DnsError):
    """Route53 could not be reached or throttled the request; may succeed on a retry."""

    transient = True


def _wrap(exc: Exception, context: str) -> DnsError:
    return translate(exc, context, error=DnsError, unavailable=DnsUnavailable)


def fqdn(name: str) -> str:
    return name if name.endswith(".") else f"{name}."


class DnsRecord(BaseModel):
    """One record set the failover moves: its name and type."""

    name: str = Field(min_length=1, description="Fully qualified record name, e.g. api.example.com.")
    type: Literal["A", "AAAA", "CNAME"] = Field(default="CNAME", description="Record type.")

    @field_validator("name")
    @classmethod
    def _qualified(cls, value: str) -> str:
        return fqdn(value.strip().lower())


@dataclass(frozen=True)
class DnsCutover:
    """What a cutover did: the records before, the change submitted (None when nothing had to change)."""

    target: str
    before: dict[str, list[str]]
    change_id: str | None
    status: str
    already_pointing: bool
    seconds_to_insync: float

    def as_dict(self) -> dict:
        return asdict(self)


class DnsZone(Block):
    """The DNS records that send clients to the primary or the secondary region.

    Example:
        ```python
        from blocks.dns import DnsZone
        zone = DnsZone.load("production")
        zone.cutover(zone.secondary_target)   # no change when already pointing there
        ```
    """

    _block_type_name = "DNS Zone"
    _block_type_slug = "dns-zone"
    _description = "A Route53 hosted zone, the records a regional failover moves, and the two regions' targets."

    hosted_zone_id: str = Field(min_length=1, description="Route53 hosted zone id, e.g. Z123456789.")
    records: list[DnsRecord] = Field(min_length=1, description="The record sets that move between regions.")
    primary_target: str = Field(min_length=1, description="Value the records hold while the primary region serves.")
    secondary_target: str = Field(min_length=1, description="Value the records hold after a failover to the DR region.")
    ttl: int = Field(default=60, gt=0, le=86400, description="TTL in seconds written with every change.")
    credentials: AwsCredentials = Field(default_factory=AwsCredentials, description="AWS credentials for Route53.")
    insync_timeout_seconds: int = Field(default=300, ge=1, description="Upper bound for a change to become INSYNC.")
    poll_interval_seconds: float = Field(default=2.0, gt=0, description="How often a change's status is read.")

    @model_validator(mode="after")
    def _distinct_targets(self) -> DnsZone:
        if self.primary_target == self.secondary_target:
            raise ValueError(f"primary_target and secondary_target are both {self.primary_target!r}")
        return self

    # Change ids this block submitted, by target: a re-run that finds the records pointing already
    # still waits for its own change to be INSYNC.
    _submitted: dict[str, str] = PrivateAttr(default_factory=dict)

    def _client(self):
        return client(self.credentials, "route53")

    def _check_target(self, target: str) -> None:
        if target not in (self.primary_target, self.secondary_target):
            raise InvalidInput(f"DNS target {target!r} is neither the primary ({self.primary_target!r}) "
                               f"nor the secondary ({self.secondary_target!r}) target of zone {self.hosted_zone_id}")

    def check_zone(self) -> str:
        """The zone's name; refuses a zone id Route53 does not know."""
        try:
            return self._client().get_hosted_zone(Id=self.hosted_zone_id)["HostedZone"]["Name"]
        except ClientError as exc:
            if error_code(exc) == "NoSuchHostedZone":
                raise InvalidInput(f"Route53 has no hosted zone {self.hosted_zone_id!r}") from exc
            raise _wrap(exc, f"reading hosted zone {self.hosted_zone_id}") from exc
        except BotoCoreError as exc:
            raise _wrap(exc, f"reading hosted zone {self.hosted_zone_id}") from exc

    def current_targets(self) -> dict[str, list[str]]:
        """``"name TYPE"`` -> the values the record holds now (empty when the record does not exist)."""
        client = self._client()
        found: dict[str, list[str]] = {}
        for record in self.records:
            try:
                page = client.list_resource_record_sets(HostedZoneId=self.hosted_zone_id, StartRecordName=record.name,
                                                        StartRecordType=record.type, MaxItems="1")
            except (ClientError, BotoCoreError) as exc:
                raise _wrap(exc, f"reading {record.name} {record.type}") from exc
            values: list[str] = []
            for rrset in page.get("ResourceRecordSets", []):
                if fqdn(rrset["Name"].lower()) == record.name and rrset["Type"] == record.type:
                    values = [r["Value"] for r in rrset.get("ResourceRecords", [])]
            found[f"{record.name} {record.type}"] = values
        return found

    def points_at(self, target: str) -> bool:
        """True when every record holds exactly ``target``."""
        return all(values == [target] for values in self.current_targets().values())

    def plan(self, target: str) -> list[str]:
        """The changes a cutover to ``target`` would make, as ``record: current -> new`` lines."""
        self._check_target(target)
        return [f"DNS {key}: {', '.join(values) or '(absent)'} -> {target} (TTL {self.ttl} s)"
                for key, values in self.current_targets().items() if values != [target]]

    def upsert(self, target: str, comment: str = "") -> str:
        """UPSERT every record to ``target``; returns the Route53 change id."""
        self._check_target(target)
        changes = [{"Action": "UPSERT", "ResourceRecordSet": {"Name": r.name, "Type": r.type, "TTL": self.ttl,
                                                              "ResourceRecords": [{"Value": target}]}}
                   for r in self.records]
        try:
            answer = self._client().change_resource_record_sets(
                HostedZoneId=self.hosted_zone_id,
                ChangeBatch={"Comment": (comment or f"point at {target}")[:256], "Changes": changes})
        except (ClientError, BotoCoreError) as exc:
            raise _wrap(exc, f"changing records of zone {self.hosted_zone_id} to {target}") from exc
        self._submitted[target] = answer["ChangeInfo"]["Id"]
        return answer["ChangeInfo"]["Id"]

    def change_status(self, change_id: str) -> str:
        try:
            return self._client().get_change(Id=change_id)["ChangeInfo"]["Status"]
        except (ClientError, BotoCoreError) as exc:
            raise _wrap(exc, f"reading change {change_id}") from exc

    def wait_insync(self, change_id: str, timeout_seconds: float | None = None) -> float:
        """Wait (bounded) until ``change_id`` is INSYNC; returns the seconds waited.

        A status read that fails transiently is read again within the same bound.
        """
        limit = timeout_seconds or self.insync_timeout_seconds
        started = time.monotonic()
        while True:
            try:
                status = self.change_status(change_id)
            except DnsUnavailable as exc:
                if time.monotonic() - started >= limit:
                    raise DnsUnavailable(f"change {change_id}: status unreadable after {limit:.0f} s: {exc}") from exc
                status = "UNKNOWN"
            if status == "INSYNC":
                return time.monotonic() - started
            if time.monotonic() - started >= limit:
                raise DnsUnavailable(f"change {change_id} still {status} after {limit:.0f} s")
            time.sleep(self.poll_interval_seconds)

    def cutover(self, target: str, comment: str = "") -> DnsCutover:
        """Point every record at ``target`` and wait until Route53 reports the change INSYNC.

        Idempotent: when every record already holds ``target`` nothing is submitted, so a re-run
        after a crash never flips DNS twice.
        """
        self._check_target(target)
        before = self.current_targets()
        if all(values == [target] for values in before.values()):
            pending = self._submitted.get(target)
            if pending:  # submitted by an earlier attempt whose wait did not finish
                waited = self.wait_insync(pending)
                self._submitted.pop(target, None)
                return DnsCutover(target, before, pending, "INSYNC", False, waited)
            return DnsCutover(target, before, None, "INSYNC", True, 0.0)
        change_id = self.upsert(target, comment)
        waited = self.wait_insync(change_id)
        self._submitted.pop(target, None)
        return DnsCutover(target, before, change_id, "INSYNC", False, waited)
