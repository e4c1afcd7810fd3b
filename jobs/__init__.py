"""Entry points, one per job: `python -m jobs.NAME --help`."""
