"""Checkpoint converters: `python -m openmoe.convert SUBCOMMAND ...` (see __main__.py for the list)."""
