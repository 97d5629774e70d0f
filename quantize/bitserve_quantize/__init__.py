"""bitserve_quantize: fine-tune with mixed precision / QLoRA, export int8/4-bit checkpoints, report quality."""
