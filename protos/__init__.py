"""Wire types of pdserve: the .proto sources and their committed generated Python code.

Import generated modules by their full package path, for example
``from protos.pdserve.v1 import generation_pb2, generation_pb2_grpc``.
Regenerate with ``python -m protos.generate`` (``make protos``).
"""
