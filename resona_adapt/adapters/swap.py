"""`AttentionSwap`: the attention heads of a hybrid-head block (Hymba) replaced by a Resona branch.

Hymba's ``HymbaBlock`` projects its input once into attention queries/keys/values, SSM inputs and
a gate, runs the attention heads (``.self_attn``) and the SSM heads in parallel, normalises each
branch's output (``pre_avg_layernorm1/2``), averages them and projects the result (``out_proj``).
``AttentionSwap`` takes the place of ``.self_attn``: the block then normalises and averages the
Resona output with the SSM output exactly as it did the attention output (the paper's ablation that
trains three consecutive swapped layers). Details:

- The branch's query input ``h`` is the hybrid-head block's input (the normalised residual stream),
  recorded by a forward pre-hook on the block (`capture_input`), because the heads themselves only
  receive projected queries/keys/values.
- The original heads still run, on exactly their arguments: their keys/values (returned as the
  second element) feed the later layers of the KV-reuse group and the cache keeps its usual
  content. Their attention output is discarded, except at the meta-token positions before X, which
  keep it (they hold no input-dependent information); with left padding the model moves the pads
  in front of the meta tokens, so the first pad count of positions after the lead (pads or meta
  tokens) keep it too.
- The branch's output projection maps to the heads' width (num_heads * v_head_dim) and starts
  random, not zero: a zero output would make the block's per-branch RMSNorm divide by ~sqrt(eps).
  This mode replaces a module, so it is not function-preserving; ``mix`` does not apply.
- Generation: the heads receive the model's cache (``past_key_value=``, `cache_in_call`), so the
  swap decodes incrementally like any Resona layer (`decode.py`), returning the unmixed
  retrieval output of the new tokens; the meta tokens are only in the prefill.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .branch import ResonaBranch
from .context import ResonaContext
from .layer import ResonaLayer, split_output


class AttentionSwap(ResonaLayer):
    """Replaces a hybrid-head block's attention heads (kept as ``base_layer``) by the Resona branch."""

    def __init__(self, base_layer: nn.Module, branch: ResonaBranch, layer_index: int, context: ResonaContext) -> None:
        super().__init__(base_layer, branch, layer_index, context)
        object.__setattr__(self, "_block_input", None)
        with torch.no_grad():
            nn.init.normal_(branch.o_proj.weight, std=branch.o_proj.in_features**-0.5)

    def capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the hybrid-head block: remember its input hidden states (B, L, D)."""
        hidden = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
        object.__setattr__(self, "_block_input", hidden)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)  # keys/values for the KV-reuse group, cache updates
        y_attn, rebuild = split_output(out)  # (B, L, A)
        hidden = self._block_input  # (B, L, D)
        object.__setattr__(self, "_block_input", None)
        if hidden is None:
            raise RuntimeError("AttentionSwap ran without its block's input: the capture hook is missing")
        lead = self._context.lead(hidden)
        h = hidden[:, lead:]  # (B, T, D)
        y_r = self.cached_output(args, kwargs, h, None)  # (B, T, A) on a decoding step, else None
        if y_r is None:  # the full-sequence path (also the prefill of a cached forward)
            x = self._context.embeddings_for(h)  # (B, T, D)
            pad = self._context.left_pad(h.shape[1])  # (B,) or None
            y_r = self.resona.retrieve_padded(h, x, pad, self.token_ids(h))  # (B, T, A)
            if pad is not None and bool(pad.any()):
                # The first pad[b] positions of row b are no input tokens: with meta tokens, the model
                # moves the pads in front of them, so these are pads or meta tokens. They keep the heads'
                # output, as the meta positions before them do.
                before = torch.arange(h.shape[1], device=h.device).unsqueeze(0) < pad.unsqueeze(1)  # (B, T)
                y_r = torch.where(before.unsqueeze(-1), y_attn[:, lead:].to(y_r.dtype), y_r)
        y = torch.cat([y_attn[:, :lead], y_r.to(y_attn.dtype)], dim=1) if lead else y_r.to(y_attn.dtype)  # (B, L, A)
        return rebuild(y)
