"""The API's routes, a module for each thing they act on; `server.app` serves them all."""

from server.routes import jobs, queue, registry, schedules, users

ROUTERS = [users.router, queue.router, jobs.router, schedules.router, registry.router]
