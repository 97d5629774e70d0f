"""A KV cache whose full-attention layers grow in place (spare columns) instead of
concatenating every step, which copies the whole cache, every layer, every step."""

from __future__ import annotations

from typing import Any

import torch


def _DynamicLayer() -> type:
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


_GROW_LAYER: type | None = None


def _grow_layer_class() -> type:
    """transformers' `DynamicLayer` with headroom: `update` writes the new step into spare
    columns instead of concatenating (which copies the whole cache, every layer, every step).
    `keys`/`values` stay the live `[B, H, past, D]` views, so `Batch.filter`/`concatenate` and
    the attention code see an ordinary cache; they replace them with exact-size tensors, and
    the next update allocates headroom again."""
    global _GROW_LAYER
    if _GROW_LAYER is None:

        class _GrowingLayer(_DynamicLayer()):  # type: ignore[misc]
            keys: torch.Tensor
            values: torch.Tensor
            _kbuf: torch.Tensor | None = None
            _vbuf: torch.Tensor | None = None

            def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
                keys, values = getattr(self, "keys", None), getattr(self, "values", None)
                if keys is None or values is None or not keys.numel():
                    # The first update (the prefill) is transformers' own, whatever its
                    # initialisation looks like in this version; the next one adds headroom.
                    return super().update(key_states, value_states, *args, **kwargs)
                n = keys.shape[-2]
                end = n + key_states.shape[-2]
                kb, vb = self._kbuf, self._vbuf
                if (
                    kb is None
                    or vb is None
                    or end > kb.shape[-2]
                    or kb.shape[:2] != key_states.shape[:2]
                    or keys.data_ptr() != kb.data_ptr()
                    or values.data_ptr() != vb.data_ptr()
                ):
                    # The tensors were replaced (prefill, filter, concatenate) or the room is
                    # used up: new buffers with headroom, the past copied once.
                    cap = end + max(64, end // 4)
                    b, h, _, d = key_states.shape
                    kb = key_states.new_empty(b, h, cap, d)
                    vb = value_states.new_empty(b, h, cap, value_states.shape[-1])
                    if n:
                        kb[:, :, :n].copy_(keys)
                        vb[:, :, :n].copy_(values)
                    self._kbuf, self._vbuf = kb, vb
                kb[:, :, n:end].copy_(key_states)
                vb[:, :, n:end].copy_(value_states)
                self.keys, self.values = kb[:, :, :end], vb[:, :, :end]
                return self.keys, self.values

            def select_rows(self, idx: torch.Tensor) -> None:
                """Keep rows `idx` with their headroom: one copy, and the next update still
                writes in place (a plain index_select would make it copy the cache again)."""
                kb, vb, n = self._kbuf, self._vbuf, self.keys.shape[-2]
                if kb is None or vb is None or self.keys.data_ptr() != kb.data_ptr():
                    self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
                    return
                self._kbuf, self._vbuf = kb.index_select(0, idx), vb.index_select(0, idx)
                self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

        _GROW_LAYER = _GrowingLayer
    return _GROW_LAYER


def new_cache(model: Any) -> Any:
    """A transformers DynamicCache for `model` whose plain full-attention layers grow in place."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        # Only plain full-attention layers grow in place; sliding-window (or other) layers
        # keep their own update rule.
        if type(layer) is _DynamicLayer():
            layer.__class__ = _grow_layer_class()
    return cache
