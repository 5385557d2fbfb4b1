"""compound's tests.

Ray reads whether its cluster asks for a token once, when it is first imported, and the test modules
import it before any stack is up: so the session's stacks take their Ray token from here (an operator's
`COMPOUND_RAY_TOKEN`), set before anything imports Ray.
"""

import os
import secrets

_token = secrets.token_hex(32)
os.environ |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _token, "COMPOUND_RAY_TOKEN": _token}
