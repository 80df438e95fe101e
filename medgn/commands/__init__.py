"""Subcommands of the ``medgn`` CLI: each module parses its arguments and calls the Python API."""
