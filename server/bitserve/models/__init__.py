"""Loading checkpoints (safetensors, GGUF via a cache), quantization configs, tiny test models."""
