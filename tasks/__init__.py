"""Retryable, idempotent steps over the blocks, one module per system."""
