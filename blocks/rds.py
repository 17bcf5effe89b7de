"""An Amazon RDS instance with a cross-region read replica, and the verbs of its failover."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

from botocore.exceptions import BotoCoreError, ClientError
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field, model_validator

from blocks._aws import client, error_code, translate
from blocks.errors import InvalidInput, RecoveryError

# Set on the replica once its promotion was requested: read replicas may keep their source link
# in the API for a while after promotion, so the tag is the journal a re-run trusts.
PROMOTED_TAG = "dr-promoted-at"
# Instance statuses that prove an instance takes no writes. Any other status (available, modifying,
# backing-up, rebooting, stopping, ...) may still take writes.
NOT_WRITING_STATUSES = frozenset({"stopped", "deleting", "failed", "storage-full", "incompatible-restore",
                                  "restore-error", "inaccessible-encryption-credentials",
                                  "inaccessible-encryption-credentials-recoverable", "incompatible-parameters"})
# Statuses a read replica passes through while a promotion is under way.
PROMOTING_STATUSES = frozenset({"modifying", "rebooting", "backing-up"})


def proves_not_writing(status: str | None) -> bool:
    """True when an instance in ``status`` cannot be taking writes; unknown or other statuses are not proof."""
    return status in NOT_WRITING_STATUSES


class RdsError(RecoveryError):
    """RDS refused or failed a request."""


class RdsUnavailable(RdsError):
    """RDS could not be reached or throttled the request; may succeed on a retry."""

    transient = True


def _wrap(exc: Exception, context: str) -> RdsError:
    return translate(exc, context, error=RdsError, unavailable=RdsUnavailable)


@dataclass(frozen=True)
class RdsPromotion:
    """The outcome of promoting the read replica; ``already_promoted`` tells a re-run apart."""

    identifier: str
    endpoint: str
    already_promoted: bool
    promoted_at: str
    status: str

    def as_dict(self) -> dict:
        return asdict(self)


class RdsDatabase(Block):
    """An RDS primary instance and the read replica that takes over when its region is lost.

    Example:
        ```python
        from blocks.rds import RdsDatabase
        db = RdsDatabase.load("orders")
        db.promote_read_replica()      # idempotent
        ```
    """

    _block_type_name = "RDS Database"
    _block_type_slug = "rds-database"
    _description = "An Amazon RDS primary instance and its (cross-region) read replica."

    instance_identifier: str = Field(min_length=1, description="DB instance identifier of the primary.")
    replica_identifier: str = Field(min_length=1, description="DB instance identifier of the read replica.")
    credentials: AwsCredentials = Field(default_factory=AwsCredentials, description="AWS credentials for RDS.")
    replica_region: str | None = Field(
        default=None, description="AWS region of the replica when it differs from the credentials' region.")
    available_timeout_seconds: int = Field(default=1800, ge=1, description="Upper bound for an instance to become available.")
    poll_interval_seconds: float = Field(default=5.0, gt=0, description="How often an instance's status is read.")

    @model_validator(mode="after")
    def _distinct(self) -> RdsDatabase:
        if self.instance_identifier == self.replica_identifier:
            raise ValueError(f"instance_identifier and replica_identifier are both {self.instance_identifier!r}")
        return self

    def _client(self, identifier: str | None = None, service: str = "rds"):
        region = self.replica_region if identifier == self.replica_identifier else None
        return client(self.credentials, service, region_name=region)

    def describe(self, identifier: str | None = None) -> dict:
        """Status, endpoint and replication links of one instance (default: the primary)."""
        identifier = identifier or self.instance_identifier
        try:
            found = self._client(identifier).describe_db_instances(DBInstanceIdentifier=identifier)["DBInstances"]
        except ClientError as exc:
            if error_code(exc) == "DBInstanceNotFound":
                raise InvalidInput(f"RDS has no DB instance {identifier!r}") from exc
            raise _wrap(exc, f"describing {identifier}") from exc
        except BotoCoreError as exc:
            raise _wrap(exc, f"describing {identifier}") from exc
        inst = found[0]
        endpoint = inst.get("Endpoint") or {}
        return {
            "identifier": inst["DBInstanceIdentifier"],
            "arn": inst.get("DBInstanceArn"),
            "status": inst.get("DBInstanceStatus"),
            "endpoint": f"{endpoint.get('Address')}:{endpoint.get('Port')}" if endpoint else None,
            "source": inst.get("ReadReplicaSourceDBInstanceIdentifier"),
            "replicas": list(inst.get("ReadReplicaDBInstanceIdentifiers") or []),
        }

    def _tags(self, arn: str, identifier: str) -> dict[str, str]:
        try:
            tags = self._client(identifier).list_tags_for_resource(ResourceName=arn)["TagList"]
        except (ClientError, BotoCoreError) as exc:
            raise _wrap(exc, f"reading tags of {identifier}") from exc
        return {t["Key"]: t["Value"] for t in tags}

    def is_promoted(self) -> bool:
        """True when the replica stands alone: no source link, or promotion already journalled in its tag."""
        info = self.describe(self.replica_identifier)
        return not info["source"] or PROMOTED_TAG in self._tags(info["arn"], self.replica_identifier)

    def replica_lag_seconds(self) -> float | None:
        """The replica's newest ``ReplicaLag`` CloudWatch datapoint of the last 5 minutes; None when none exists."""
        now = datetime.now(timezone.utc)
        try:
            points = self._client(self.replica_identifier, "cloudwatch").get_metric_statistics(
                Namespace="AWS/RDS", MetricName="ReplicaLag",
                Dimensions=[{"Name": "DBInstanceIdentifier", "Value": self.replica_identifier}],
                StartTime=now - timedelta(minutes=5), EndTime=now, Period=60, Statistics=["Maximum"],
            )["Datapoints"]
        except (ClientError, BotoCoreError) as exc:
            raise _wrap(exc, f"reading ReplicaLag of {self.replica_identifier}") from exc
        if not points:
            return None
        value = max(points, key=lambda p: p["Timestamp"]).get("Maximum")
        # RDS reports -1 (or nothing) when replication is not running: the lag is unknown, not zero.
        return None if value is None or float(value) < 0 else float(value)

    def wait_available(self, identifier: str | None = None, timeout_seconds: float | None = None) -> dict:
        """Wait (bounded) until the instance's status is ``available``; returns its description."""
        identifier = identifier or self.instance_identifier
        limit = timeout_seconds or self.available_timeout_seconds
        started = time.monotonic()
        while True:
            info = self.describe(identifier)
            if info["status"] == "available":
                return info
            if time.monotonic() - started >= limit:
                raise RdsUnavailable(f"{identifier} still {info['status']} after {limit:.0f} s")
            time.sleep(self.poll_interval_seconds)

    def promote_read_replica(self) -> RdsPromotion:
        """Promote the read replica to a standalone primary and wait until it is available.

        Idempotent: a replica without a source link, or whose promotion tag is set, is not promoted
        again; a second request refused because promotion is already under way counts as done.
        """
        info = self.describe(self.replica_identifier)
        tags = self._tags(info["arn"], self.replica_identifier)
        if not info["source"] or PROMOTED_TAG in tags:
            info = self.wait_available(self.replica_identifier)
            return RdsPromotion(self.replica_identifier, info["endpoint"], True, tags.get(PROMOTED_TAG, ""), info["status"])
        client = self._client(self.replica_identifier)
        accepted = True
        try:
            client.promote_read_replica(DBInstanceIdentifier=self.replica_identifier)
        except ClientError as exc:
            if error_code(exc) != "InvalidDBInstanceState":
                raise _wrap(exc, f"promoting {self.replica_identifier}") from exc
            # Refused: go on only when a promotion (of an earlier attempt) is really under way.
            again = self.describe(self.replica_identifier)
            if again["source"] and again["status"] not in PROMOTING_STATUSES:
                raise _wrap(exc, f"promoting {self.replica_identifier} (status {again['status']}, "
                                 f"still replicating from {again['source']})") from exc
            accepted = False
        except BotoCoreError as exc:
            raise _wrap(exc, f"promoting {self.replica_identifier}") from exc
        promoted_at = datetime.now(timezone.utc).isoformat()
        if accepted:
            try:
                client.add_tags_to_resource(ResourceName=info["arn"], Tags=[{"Key": PROMOTED_TAG, "Value": promoted_at}])
            except (ClientError, BotoCoreError) as exc:
                raise _wrap(exc, f"journalling the promotion of {self.replica_identifier}") from exc
        info = self.wait_available(self.replica_identifier)
        if info["source"] and not accepted:
            raise RdsError(f"{self.replica_identifier} is available but still replicates from {info['source']}: "
                           "the promotion did not happen")
        return RdsPromotion(self.replica_identifier, info["endpoint"], False, promoted_at, info["status"])
