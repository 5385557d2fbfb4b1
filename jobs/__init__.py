"""User-facing specs, Ray Jobs submission and the `compound` command line."""
