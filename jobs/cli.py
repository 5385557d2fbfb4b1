"""The `compound` command line."""
