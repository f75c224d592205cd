"""Llama-family model (``llama``), HF checkpoint loading (``loader``) and the built-in
random-weight checkpoints (``builtin``)."""
