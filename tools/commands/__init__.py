"""Subcommands of the fedser tools CLI."""
