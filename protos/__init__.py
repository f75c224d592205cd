"""Wire types of pdserve: the .proto sources and their committed generated Python code.

Import generated modules by their full package path, for example
``from pdserve.protos.pdserve.v1 import generation_pb2, generation_pb2_grpc``.
Regenerate with ``make protos`` (``python -m pdserve.protos.generate``), which also refreshes
the client SDK's copy of the public stubs.
"""
