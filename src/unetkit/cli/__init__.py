"""Argument parsing only: each subcommand calls one library function."""
