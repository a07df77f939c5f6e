"""One exception tree for the core. The server maps each leaf to a gRPC status in one table."""

from __future__ import annotations


class RetrieverError(Exception):
    """Base of every error the core raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(RetrieverError):
    """The request is malformed or over a limit; ``field`` names the offending field."""


class NotFound(RetrieverError):
    """A namespace, document or chunk that the request names does not exist."""


class AlreadyExists(RetrieverError):
    """Creating something whose name is taken."""


class FailedPrecondition(RetrieverError):
    """The system is not in a state the request needs (e.g. an engine is not installed)."""


class ModelMismatch(FailedPrecondition):
    """A namespace was built by another embedder / dimension / backend than is loaded."""


class Overloaded(RetrieverError):
    """Too much work in flight; retry later."""


class NotReady(RetrieverError):
    """The service is still loading or already draining."""


class Unimplemented(RetrieverError):
    """A declared feature that has not shipped yet."""
