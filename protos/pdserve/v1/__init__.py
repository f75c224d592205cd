"""pdserve.v1 wire types: ``generation_pb2`` (messages) and ``generation_pb2_grpc`` (stubs).

The generated code embeds version checks: it needs protobuf >= 7.35.1 and grpcio >= 1.85.1
at runtime (the versions of the protoc and plugin in grpcio-tools 1.85.1 that produced it).
"""
