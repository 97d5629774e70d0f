"""bitserve: a gRPC inference server for quantized Hugging Face checkpoints."""

__version__ = "0.1.0"
