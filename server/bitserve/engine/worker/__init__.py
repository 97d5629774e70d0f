"""What runs on the weights for generation: the running batch, its KV cache, the forward passes
(prefill, decode, label scoring) and per-row token choice. Token ids in, token ids out."""
