"""Domain errors, raised by engines that know nothing of gRPC and mapped to gRPC statuses at the edge.

Each error names the request field at fault when there is one, so the gRPC layer can attach a
`google.rpc.BadRequest` detail that tells the caller exactly what to fix.
"""

from __future__ import annotations


class SpecdecError(Exception):
    """Base of all errors that become a gRPC status other than INTERNAL."""

    code_name = "INTERNAL"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(SpecdecError):
    code_name = "INVALID_ARGUMENT"


class NotFound(SpecdecError):
    """A session the service does not hold (never started, ended, expired, or lost with a restart):
    its own status, so that a caller can tell a lost session from a bad request."""

    code_name = "NOT_FOUND"


class FailedPrecondition(SpecdecError):
    code_name = "FAILED_PRECONDITION"


class ResourceExhausted(SpecdecError):
    """Over a configured limit (sessions, cache memory); the caller may retry later."""

    code_name = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(SpecdecError):
    code_name = "UNAVAILABLE"


class OutputIncomplete(Unavailable):
    """A generation that could not go on (its target was lost): what it generated so far travels
    with the status (an ErrorInfo detail), so a unary caller does not lose it."""

    def __init__(self, message: str, token_ids: list[int], text: str):
        super().__init__(message)
        self.token_ids = token_ids
        self.text = text


class DeadlineExceeded(SpecdecError):
    code_name = "DEADLINE_EXCEEDED"


class Upstream(SpecdecError):
    """A model service answered with an error status; it is passed on with the same code."""

    def __init__(self, code_name: str, message: str):
        super().__init__(message)
        self.code_name = code_name
