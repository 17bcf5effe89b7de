"""Retry and timeout policy shared by every task.

Transient failures (lost connections, a server still starting) retry with exponential
backoff and jitter; validation, authentication and other definite errors fail at once.
"""

from __future__ import annotations

import psycopg
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from blocks.errors import RecoveryError


def retry_only_transient(task, task_run, state) -> bool:
    """Retry condition: True only for errors that may go away on their own."""
    try:
        state.result()
    except RecoveryError as exc:
        return exc.transient
    except psycopg.OperationalError:
        return True
    except Exception:  # anything else is definite: do not repeat it
        return False
    return False


def policy(timeout_seconds: float, retries: int = 3) -> dict:
    """Keyword arguments for ``@task``: bounded time, transient-only retries with backoff and jitter."""
    return dict(
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=1),
        retry_jitter_factor=0.5,
        retry_condition_fn=retry_only_transient,
        timeout_seconds=timeout_seconds,
        cache_policy=NO_CACHE,
    )
