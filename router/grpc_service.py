"""Registers ``pdserve.v1.Generation`` on a gRPC server with request parsing that cannot
fail the call badly.

The generated ``add_GenerationServicer_to_server`` parses requests with ``FromString``: a
message that does not parse makes grpc log a traceback per call and answer UNKNOWN /
INTERNAL. Here a message that does not parse becomes an ``Undecodable`` value, which the
servicer answers with INVALID_ARGUMENT naming the message type; the refusals are logged at
most once a minute (``RefusalLog``), so a client sending garbage cannot fill the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from pdserve.kvtransfer.auth import RefusalLog
from pdserve.protos.pdserve.v1 import generation_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE = "pdserve.v1.Generation"


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request that is not a valid ``message`` (``size`` bytes on the wire)."""

    message: str
    size: int

    def describe(self) -> str:
        return f"the request is not a valid {self.message} message ({self.size} bytes)"


def _tolerant(cls: Any, refusals: RefusalLog) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name

    def parse(raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except Exception as exc:  # DecodeError, or a message too deep to parse
            refusals.refused(f"{name} of {len(raw)} bytes: {type(exc).__name__}")
            return Undecodable(name, len(raw))

    return parse


def add_generation_service(servicer: Any, server: grpc.aio.Server) -> None:
    """What ``add_GenerationServicer_to_server`` does, with tolerant request parsing."""
    refusals = RefusalLog(logger, "undecodable gRPC requests")
    rpcs = {
        "Generate": (grpc.unary_stream_rpc_method_handler, pb.GenerateRequest,
                     pb.GenerateResponse),
        "Chat": (grpc.unary_stream_rpc_method_handler, pb.ChatRequest, pb.ChatResponse),
        "ListModels": (grpc.unary_unary_rpc_method_handler, pb.ListModelsRequest,
                       pb.ListModelsResponse),
        "Tokenize": (grpc.unary_unary_rpc_method_handler, pb.TokenizeRequest,
                     pb.TokenizeResponse),
        "GetStats": (grpc.unary_unary_rpc_method_handler, pb.GetStatsRequest,
                     pb.GetStatsResponse),
        "Detokenize": (grpc.unary_unary_rpc_method_handler, pb.DetokenizeRequest,
                       pb.DetokenizeResponse),
        "GetVersion": (grpc.unary_unary_rpc_method_handler, pb.GetVersionRequest,
                       pb.GetVersionResponse),
    }
    handlers = {
        name: make(getattr(servicer, name), request_deserializer=_tolerant(req, refusals),
                   response_serializer=resp.SerializeToString)
        for name, (make, req, resp) in rpcs.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
