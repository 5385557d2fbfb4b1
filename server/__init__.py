"""`compound server`: one service for a shared cluster. It runs the schedules, and answers an HTTP API
(FastAPI, with its OpenAPI schema at /openapi.json) for its users: bearer tokens, roles, an audit log,
and the registry's promotions. `compound up` starts it; the CLI is its client."""
