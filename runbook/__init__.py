"""The parts every recovery runbook shares: the run, its parameters, approval, locks, evidence and KPIs.

Layering: flows -> runbook -> tasks -> blocks.
"""
