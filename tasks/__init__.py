"""Prefect tasks: thin, cached wrappers around library functions."""
