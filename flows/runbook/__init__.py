"""Runbook parts every recovery shares: the machinery between the flows and the tasks."""
