"""The public API's generated stubs (``generation_pb2``, ``generation_pb2_grpc``), copied here by
the server repository's ``make protos`` so that the SDK needs only grpcio and protobuf."""
