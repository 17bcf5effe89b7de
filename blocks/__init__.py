"""Prefect blocks that describe the estate and own its clients.

Register them with ``prefect block register -m blocks``.
"""

from blocks.errors import (
    ApprovalError,
    BackupError,
    CommandFailed,
    InvalidInput,
    PostgresError,
    PostgresUnavailable,
    RecoveryError,
    RecoveryInProgress,
)
from blocks.aws_security import AwsError, AwsUnavailable, IamPrincipals, QuarantineSecurityGroup, SecretsManagerStore
from blocks.backup_sources import BackupCheck, BackupSources, ObjectPrefixSource, PgBackRestSource
from blocks.dns import DnsError, DnsRecord, DnsZone
from blocks.evidence_vault import EvidenceVault
from blocks.health import HealthEndpoints, HealthError
from blocks.kubernetes import KubernetesError, KubernetesTarget, KubernetesUnavailable, RolloutNotReady
from blocks.models import ModelRegistry, ModelRegistryError
from blocks.object_store import ObjectStore, ObjectStoreError, ObjectStoreUnavailable
from blocks.objectives import Objective, RecoveryObjectives
from blocks.qdrant import EmbeddingTable, QdrantCluster, QdrantError
from blocks.rds import RdsDatabase, RdsError
from blocks.redis_cache import RedisCache, RedisError, RedisUnavailable
from blocks.region import Region
from blocks.routing import IncidentRouting, SeverityRoute, Tier
from blocks.postgres import PostgresCluster, PostgresInstance, VerificationQuery
from blocks.results import CheckResult

__all__ = [
    "IncidentRouting",
    "SeverityRoute",
    "Tier",
    "BackupCheck",
    "BackupSources",
    "ModelRegistry",
    "ModelRegistryError",
    "ObjectPrefixSource",
    "PgBackRestSource",
    "AwsError",
    "AwsUnavailable",
    "DnsError",
    "DnsRecord",
    "DnsZone",
    "EmbeddingTable",
    "EvidenceVault",
    "HealthEndpoints",
    "HealthError",
    "IamPrincipals",
    "KubernetesError",
    "KubernetesTarget",
    "KubernetesUnavailable",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectStoreUnavailable",
    "QuarantineSecurityGroup",
    "QdrantCluster",
    "QdrantError",
    "RdsDatabase",
    "RdsError",
    "RedisCache",
    "RedisError",
    "RedisUnavailable",
    "Region",
    "RolloutNotReady",
    "SecretsManagerStore",
    "ApprovalError",
    "BackupError",
    "CheckResult",
    "CommandFailed",
    "InvalidInput",
    "Objective",
    "PostgresCluster",
    "PostgresError",
    "PostgresInstance",
    "PostgresUnavailable",
    "RecoveryError",
    "RecoveryInProgress",
    "RecoveryObjectives",
    "VerificationQuery",
]
