"""The `compound` command line (`compound/cli/`): the top of the package table in ARCHITECTURE.md, the one
place that knows every package; nothing below imports it."""
