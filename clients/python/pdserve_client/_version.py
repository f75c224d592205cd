# Copied from pdserve/_version.py by `make protos`. DO NOT EDIT.
"""The one source of pdserve's version (the server, ``pdserve --version`` and the client SDK,
whose ``pdserve_client/_version.py`` ``make protos`` copies from here)."""

__version__ = "0.2.0"
