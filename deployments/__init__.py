"""How flows are served (work pools, schedules in prefect.yaml) and the project CLI."""
