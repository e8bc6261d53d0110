"""Subcommands of the ``archir`` CLI, one module each."""
