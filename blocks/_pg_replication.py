"""Replication verbs of :class:`blocks.postgres.PostgresCluster`: lag, promotion of a replica, resync."""

from __future__ import annotations


class ReplicationVerbs:
    """Mixed into ``PostgresCluster``; uses its ``connect``/``query_one``/``_pg_ctl`` plumbing."""
