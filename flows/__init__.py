"""Recovery flows: one module per scenario; each reads like the runbook it replaces."""
