"""AWS blocks a security incident needs: IAM access keys, Secrets Manager values, and an EC2
quarantine security group. Every client comes from a prefect-aws ``AwsCredentials`` block.

Secret values only ever exist as ``SecretStr`` here and are never part of an error message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError
from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field, SecretStr

from blocks._aws import client, error_code, translate
from blocks.errors import InvalidInput, RecoveryError

NOT_FOUND_CODES = {"NoSuchEntity", "ResourceNotFoundException", "InvalidInstanceID.NotFound",
                   "InvalidInstanceID.Malformed", "InvalidGroup.NotFound"}


class AwsError(RecoveryError):
    """An AWS API refused or failed a call."""


class AwsUnavailable(AwsError):
    """An AWS API could not be reached or throttled the call; may succeed on a retry."""

    transient = True


def aws_error(exc: Exception, context: str) -> AwsError:
    """The AwsError for a failed AWS call, transient by the one rule of ``blocks._aws``."""
    return translate(exc, context, error=AwsError, unavailable=AwsUnavailable)


@dataclass(frozen=True)
class AccessKey:
    """An IAM access key; ``secret`` is only set for a key just created."""

    user: str
    access_key_id: str
    status: str
    secret: SecretStr | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------- IAM


class IamPrincipals(Block):
    """IAM users and their access keys: list, deactivate, create.

    Example:
        ```python
        from blocks.aws_security import IamPrincipals
        iam = IamPrincipals.load("production")
        [k.access_key_id for k in iam.access_keys("ci-deployer") if k.status == "Active"]
        ```
    """

    _block_type_name = "IAM Principals"
    _block_type_slug = "iam-principals"
    _description = "IAM users of one AWS account and the verbs to revoke and replace their access keys."

    credentials: AwsCredentials = Field(default_factory=AwsCredentials, description="AWS credentials allowed to manage IAM users' keys.")

    def _iam(self):
        return client(self.credentials, "iam")

    def user_exists(self, user: str) -> bool:
        try:
            self._iam().get_user(UserName=user)
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                return False
            raise aws_error(exc, f"reading IAM user {user!r}") from exc
        except BotoCoreError as exc:
            raise aws_error(exc, f"reading IAM user {user!r}") from exc
        return True

    def access_keys(self, user: str) -> list[AccessKey]:
        """The user's access keys with their status."""
        try:
            items = self._iam().list_access_keys(UserName=user)["AccessKeyMetadata"]
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                raise InvalidInput(f"IAM user {user!r} does not exist") from exc
            raise aws_error(exc, f"listing access keys of {user!r}") from exc
        except BotoCoreError as exc:
            raise aws_error(exc, f"listing access keys of {user!r}") from exc
        return [AccessKey(user, item["AccessKeyId"], item["Status"]) for item in items]

    def deactivate_access_key(self, user: str, access_key_id: str) -> bool:
        """Set the key Inactive. Idempotent; returns False when it already was."""
        current = {k.access_key_id: k for k in self.access_keys(user)}
        if access_key_id not in current:
            raise InvalidInput(f"access key {access_key_id} does not belong to IAM user {user!r}")
        if current[access_key_id].status == "Inactive":
            return False
        try:
            self._iam().update_access_key(UserName=user, AccessKeyId=access_key_id, Status="Inactive")
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"deactivating access key {access_key_id} of {user!r}") from exc
        return True

    def delete_access_key(self, user: str, access_key_id: str) -> None:
        """Delete an (inactive) key, to make room under IAM's two-keys-per-user limit."""
        try:
            self._iam().delete_access_key(UserName=user, AccessKeyId=access_key_id)
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"deleting access key {access_key_id} of {user!r}") from exc

    def create_access_key(self, user: str) -> AccessKey:
        """A new Active key; its secret is returned once, as a ``SecretStr``."""
        try:
            created = self._iam().create_access_key(UserName=user)["AccessKey"]
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"creating an access key for {user!r}") from exc
        return AccessKey(user, created["AccessKeyId"], created["Status"], SecretStr(created["SecretAccessKey"]))

    def caller_arn(self, access_key_id: str, secret: SecretStr) -> str:
        """The ARN AWS attributes a call signed with this key to (STS GetCallerIdentity)."""
        params = self.credentials.aws_client_parameters
        probe = AwsCredentials(aws_access_key_id=access_key_id, aws_secret_access_key=secret,
                               region_name=self.credentials.region_name, aws_client_parameters=params)
        try:
            return client(probe, "sts").get_caller_identity()["Arn"]
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"calling STS with access key {access_key_id}") from exc


# ---------------------------------------------------------------------------------------------- Secrets Manager


class SecretsManagerStore(Block):
    """Secrets Manager secrets: write a new current value, read the current one.

    Example:
        ```python
        from blocks.aws_security import SecretsManagerStore
        store = SecretsManagerStore.load("production")
        store.exists("prod/db/app")
        ```
    """

    _block_type_name = "Secrets Manager Store"
    _block_type_slug = "secrets-manager-store"
    _description = "AWS Secrets Manager secrets that recoveries rotate and read (current stage only)."

    credentials: AwsCredentials = Field(default_factory=AwsCredentials, description="AWS credentials allowed to read and write the secrets.")
    kms_key_id: str | None = Field(default=None, description="KMS key for secrets this block creates; the account default when empty.")

    def _sm(self):
        return client(self.credentials, "secretsmanager")

    def exists(self, secret_id: str) -> bool:
        try:
            self._sm().describe_secret(SecretId=secret_id)
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                return False
            raise aws_error(exc, f"describing secret {secret_id!r}") from exc
        except BotoCoreError as exc:
            raise aws_error(exc, f"describing secret {secret_id!r}") from exc
        return True

    def tags(self, secret_id: str) -> dict[str, str]:
        try:
            described = self._sm().describe_secret(SecretId=secret_id)
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"describing secret {secret_id!r}") from exc
        return {t["Key"]: t["Value"] for t in described.get("Tags", [])}

    def put_value(self, secret_id: str, value: SecretStr, tags: dict[str, str] | None = None) -> str:
        """Make ``value`` the current (AWSCURRENT) value, creating the secret when missing; returns the version id."""
        client = self._sm()
        tag_list = [{"Key": k, "Value": v} for k, v in (tags or {}).items()]
        try:
            if self.exists(secret_id):
                version = client.put_secret_value(SecretId=secret_id, SecretString=value.get_secret_value())["VersionId"]
                if tag_list:
                    client.tag_resource(SecretId=secret_id, Tags=tag_list)
                return version
            extra = {"KmsKeyId": self.kms_key_id} if self.kms_key_id else {}
            return client.create_secret(Name=secret_id, SecretString=value.get_secret_value(), Tags=tag_list,
                                        **extra)["VersionId"]
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"writing a new value of secret {secret_id!r}") from exc

    def current_value(self, secret_id: str) -> SecretStr:
        """The AWSCURRENT value (asked for explicitly: without a stage some implementations return an older one)."""
        try:
            got = self._sm().get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                raise InvalidInput(f"secret {secret_id!r} does not exist") from exc
            raise aws_error(exc, f"reading secret {secret_id!r}") from exc
        except BotoCoreError as exc:
            raise aws_error(exc, f"reading secret {secret_id!r}") from exc
        return SecretStr(got["SecretString"])

    def current_json(self, secret_id: str) -> dict[str, SecretStr]:
        """The current value read as a JSON object, each member kept as a ``SecretStr``."""
        try:
            data = json.loads(self.current_value(secret_id).get_secret_value())
            return {k: SecretStr(str(v)) for k, v in data.items()}
        except (json.JSONDecodeError, AttributeError) as exc:
            raise AwsError(f"secret {secret_id!r} does not hold a JSON object") from exc


# ---------------------------------------------------------------------------------------------- EC2


@dataclass(frozen=True)
class Quarantine:
    """What quarantining an instance did: its groups before (per network interface), the quarantine group now."""

    instance_id: str
    group_id: str
    previous_groups: list[str]
    already: bool
    previous_by_interface: dict[str, list[str]] = field(default_factory=dict)


class QuarantineSecurityGroup(Block):
    """An EC2 security group without any rule, attached in place of the groups of every network interface of an instance.

    Example:
        ```python
        from blocks.aws_security import QuarantineSecurityGroup
        ec2 = QuarantineSecurityGroup.load("production")
        ec2.quarantine("i-0123456789abcdef0")
        ```
    """

    _block_type_name = "Quarantine Security Group"
    _block_type_slug = "quarantine-security-group"
    _description = "An EC2 security group with no ingress and no egress rule, used to isolate instances."

    credentials: AwsCredentials = Field(default_factory=AwsCredentials, description="AWS credentials allowed to manage security groups and instances.")
    group_name: str = Field(default="dr-quarantine", description="Name of the quarantine group (one per VPC).")
    previous_groups_tag: str = Field(default="dr:previous-security-groups",
                                     description="Tag, on the instance and on each of its network interfaces, that keeps "
                                                 "the groups they had before quarantine.")

    def _ec2(self):
        return client(self.credentials, "ec2")

    def describe_instance(self, instance_id: str) -> dict:
        try:
            reservations = self._ec2().describe_instances(InstanceIds=[instance_id])["Reservations"]
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                raise InvalidInput(f"EC2 instance {instance_id!r} does not exist") from exc
            raise aws_error(exc, f"describing instance {instance_id!r}") from exc
        except BotoCoreError as exc:
            raise aws_error(exc, f"describing instance {instance_id!r}") from exc
        instances = [i for r in reservations for i in r["Instances"]]
        if not instances:
            raise InvalidInput(f"EC2 instance {instance_id!r} does not exist")
        return instances[0]

    def interface_groups(self, instance_id: str, instance: dict | None = None) -> dict[str, list[str]]:
        """The security groups of each network interface of the instance (ENI id -> group ids)."""
        instance = instance or self.describe_instance(instance_id)
        return {eni["NetworkInterfaceId"]: [g["GroupId"] for g in eni.get("Groups", [])]
                for eni in instance.get("NetworkInterfaces", []) if eni.get("NetworkInterfaceId")}

    def instance_groups(self, instance_id: str) -> list[str]:
        """Every security group of the instance: of the instance record and of each of its network interfaces."""
        instance = self.describe_instance(instance_id)
        groups = [g["GroupId"] for g in instance.get("SecurityGroups", [])]
        for eni_groups in self.interface_groups(instance_id, instance).values():
            groups += [g for g in eni_groups if g not in groups]
        return groups

    def group_rules(self, group_id: str) -> tuple[list, list]:
        """(ingress, egress) rules of a group."""
        try:
            group = self._ec2().describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"describing security group {group_id}") from exc
        return group.get("IpPermissions", []), group.get("IpPermissionsEgress", [])

    def ensure_group(self, vpc_id: str) -> str:
        """The quarantine group of ``vpc_id`` with every rule removed, created when missing. Idempotent."""
        ec2 = self._ec2()
        try:
            found = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [self.group_name]},
                                                          {"Name": "vpc-id", "Values": [vpc_id]}])["SecurityGroups"]
            if found:
                group_id = found[0]["GroupId"]
            else:
                group_id = ec2.create_security_group(
                    GroupName=self.group_name, VpcId=vpc_id,
                    Description="Isolation of compromised instances: no ingress, no egress")["GroupId"]
            ingress, egress = self.group_rules(group_id)
            if ingress:
                ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=ingress)
            if egress:
                ec2.revoke_security_group_egress(GroupId=group_id, IpPermissions=egress)
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"preparing quarantine group {self.group_name!r} in {vpc_id}") from exc
        return group_id

    def _saved_groups(self, tags: list[dict] | None) -> list[str]:
        value = {t["Key"]: t["Value"] for t in tags or []}.get(self.previous_groups_tag, "")
        return [g for g in value.split(",") if g]

    def quarantine(self, instance_id: str) -> Quarantine:
        """Replace the groups of every network interface of the instance with the quarantine group. Idempotent.

        Each interface's groups go into a tag on that interface (and their union into a tag on the
        instance) before they are replaced, so the quarantine can be lifted exactly; the tag of an
        earlier, interrupted run is kept while the quarantine group is already attached.
        """
        instance = self.describe_instance(instance_id)
        vpc_id = instance.get("VpcId")
        if not vpc_id:
            raise InvalidInput(f"EC2 instance {instance_id!r} is not in a VPC; security groups cannot isolate it")
        group_id = self.ensure_group(vpc_id)
        interfaces = self.interface_groups(instance_id, instance)
        enis = {eni["NetworkInterfaceId"]: eni for eni in instance.get("NetworkInterfaces", [])
                if eni.get("NetworkInterfaceId")}
        ec2 = self._ec2()
        previous_by_interface: dict[str, list[str]] = {}
        changed = False
        try:
            if interfaces:
                described = ec2.describe_network_interfaces(NetworkInterfaceIds=list(interfaces))["NetworkInterfaces"]
                tags_of = {d["NetworkInterfaceId"]: d.get("TagSet", []) for d in described}
                for eni_id, groups in interfaces.items():
                    saved = self._saved_groups(tags_of.get(eni_id) or enis[eni_id].get("TagSet"))
                    if groups == [group_id]:
                        previous_by_interface[eni_id] = saved
                        continue
                    # A tag is trusted only while the interface is half-way into quarantine (an earlier run's).
                    previous = saved if saved and group_id in groups else [g for g in groups if g != group_id]
                    ec2.create_tags(Resources=[eni_id], Tags=[{"Key": self.previous_groups_tag, "Value": ",".join(previous)}])
                    ec2.modify_network_interface_attribute(NetworkInterfaceId=eni_id, Groups=[group_id])
                    previous_by_interface[eni_id] = previous
                    changed = True
            union: list[str] = []
            for groups in previous_by_interface.values():
                union += [g for g in groups if g not in union]
            kept = self._saved_groups(instance.get("Tags"))
            now = self.instance_groups(instance_id)
            if now != [group_id]:
                if not kept or group_id not in now:
                    union += [g for g in now if g != group_id and g not in union]
                    ec2.create_tags(Resources=[instance_id],
                                    Tags=[{"Key": self.previous_groups_tag, "Value": ",".join(union)}])
                try:
                    # The instance-level groups are its primary interface's; AWS refuses this call for an
                    # instance with several interfaces, which the per-interface calls above already isolated.
                    ec2.modify_instance_attribute(InstanceId=instance_id, Groups=[group_id])
                except ClientError as exc:
                    if not (error_code(exc) == "InvalidInstanceID" and len(interfaces) > 1):
                        raise
                changed = True
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"quarantining instance {instance_id}") from exc
        return Quarantine(instance_id, group_id, union or kept, already=not changed,
                          previous_by_interface=previous_by_interface)
