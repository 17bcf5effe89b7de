"""Loading the blocks that describe the estate, with errors that name what is missing."""

from __future__ import annotations

from typing import TypeVar

from prefect.blocks.core import Block
from pydantic import ValidationError

from blocks.errors import InvalidInput

B = TypeVar("B", bound=Block)


def load_block(cls: type[B], name: str, default: B | None = None) -> B:
    """Load the ``cls`` block called ``name``; with ``default``, fall back to it when absent."""
    if not name or not name.strip():
        raise InvalidInput(f"{cls.__name__} block name is empty")
    try:
        return cls.load(name)
    except ValidationError as exc:
        raise InvalidInput(f"{cls.__name__} block {name!r} is invalid: {exc}") from exc
    except ValueError as exc:
        if default is not None:
            return default
        slug = cls.get_block_type_slug()
        raise InvalidInput(
            f"no {cls.__name__} block named {name!r}; list them with `prefect block ls` (type {slug})"
        ) from exc
