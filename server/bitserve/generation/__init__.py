"""Continuous batching for causal LMs, as it runs inside an engine process.

state (one request), batch (filter/concatenate), cache (a KV cache that grows in place),
sampling (per-row token choice), policy (pure: what to admit when), runner (the forward passes),
scheduler (the step loop that ties them together). Nothing here knows about gRPC, asyncio or
text: token ids in, token ids out.
"""
