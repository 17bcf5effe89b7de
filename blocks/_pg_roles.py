"""Role verbs of :class:`blocks.postgres.PostgresCluster`: logins, sessions and passwords of roles."""

from __future__ import annotations


class RoleVerbs:
    """Mixed into ``PostgresCluster``; uses its ``connect``/``query_one`` plumbing."""
