"""Errors raised by the pdserve client: one class per gRPC status a caller can act on.

Every failed call raises a ``PdserveError`` (never a bare ``grpc.RpcError``) whose ``code`` is
the gRPC status and whose ``message`` is the server's status details, unchanged.
"""

from __future__ import annotations

import grpc


class PdserveError(Exception):
    """A call to a pdserve service failed with gRPC status ``code``.

    Statuses without a dedicated subclass (``INTERNAL``, ...) raise this class.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(PdserveError):
    """The request was rejected as malformed (bad prompt, sampling parameters out of range)."""


class NotFound(PdserveError):
    """The request named a model the service does not serve (see ``Client.models``)."""


class ResourceExhausted(PdserveError):
    """The service is at capacity (admission control); retry later or lower the load."""


class Unauthenticated(PdserveError):
    """The API key is missing or wrong."""


class Unavailable(PdserveError):
    """The service could not be reached, after the client's retries."""


class DeadlineExceeded(PdserveError):
    """The call's deadline (``timeout``) passed before it finished."""


class Cancelled(PdserveError):
    """The call was cancelled (by this client or the server)."""


_BY_CODE: dict[grpc.StatusCode, type[PdserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_for(code: grpc.StatusCode, message: str) -> PdserveError:
    """The ``PdserveError`` subclass instance for ``code``."""
    return _BY_CODE.get(code, PdserveError)(code, message)


def from_rpc_error(err: grpc.RpcError) -> PdserveError:
    """Translate a grpc error (sync or asyncio) into the matching ``PdserveError``."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_for(code, details or str(err))
