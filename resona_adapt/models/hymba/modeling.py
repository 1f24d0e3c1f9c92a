"""resona-adapt's own Hymba: `HymbaModel` and `HymbaForCausalLM`, pure PyTorch, CPU-friendly.

Loads NVIDIA's released checkpoints (nvidia/Hymba-1.5B-Base layout: ``model.embed_tokens``,
``model.memory_tokens``, ``model.layers.<i>.{input_layernorm,mamba.*,pre_moe_layernorm,moe.experts.0.*}``,
``model.final_layernorm``, ``lm_head`` tied to the embedding) and reproduces the released
model's forward ("flex" attention implementation):

- ``num_memory_tokens`` learned meta tokens are prepended after the embedding on the first forward
  of a sequence (not in the embedding module) and removed from the output; positions count them
  (rotary positions 0..M-1 are the meta tokens', the first input token is at M);
- layers in ``global_attn_idx`` attend causally to everything; the others use a sliding window
  (query i sees key j when i - j <= sliding_window) and always see the meta tokens;
- consumer layers of a ``kv_reuse_group`` use the keys/values of the group's first layer;
- left padding: like NVIDIA's code, pad positions are moved in front of the meta tokens; unlike
  it, pads take no position, pad keys are masked out and pads are zeroed before the SSM heads, so a
  padded row gives its unpadded logits (NVIDIA's flex path ignores padding).
Decoding keeps every key/value in `HymbaCache` and applies the same masks, so decoding step by step
gives the logits of one full forward (NVIDIA's decoding path trims its cache to the meta tokens
plus the window).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ...compat import CACHE_FIELD  # the forwards accept both keywords; outputs use the installed one
from .cache import HymbaCache
from .configuration import HymbaConfig
from .layers import HymbaBlock, HymbaDecoderLayer, HymbaRMSNorm, HymbaRope

PAD, META, REAL = 0, 1, 2  # kind of each position of the packed sequence


class HymbaPreTrainedModel(PreTrainedModel):
    config_class = HymbaConfig
    config: HymbaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["HymbaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _is_stateful = True
    _supports_sdpa = True  # the heads call SDPA with their own masks

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HymbaBlock):
            N, I = module.ssm_state_size, module.intermediate_size
            A = torch.arange(1, N + 1, dtype=torch.float32)[None, :].expand(I, -1)
            init.copy_(module.A_log[0], torch.log(A))
            init.ones_(module.D[0])
        elif isinstance(module, HymbaModel) and module.memory_tokens is not None:
            init.normal_(module.memory_tokens, mean=0.0, std=1.0)
        elif isinstance(module, HymbaRope):
            init.copy_(module.inv_freq, module.initial_inv_freq())


class HymbaModel(HymbaPreTrainedModel):
    def __init__(self, config: HymbaConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        reuse = config.kv_reuse_layers()
        self.layers = nn.ModuleList(
            [HymbaDecoderLayer(config, i, reuse_kv=i in reuse) for i in range(config.num_hidden_layers)]
        )
        self.final_layernorm = HymbaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        M = config.num_memory_tokens
        self.memory_tokens = nn.Parameter(torch.randn(M, config.hidden_size)) if M > 0 else None
        if config.memory_tokens_interspersed_every:
            raise ValueError("memory_tokens_interspersed_every > 0 is not supported (the released models use 0)")
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    # -- masks and positions --------------------------------------------------------------------
    def _pack(self, embeds: Tensor, attention_mask: Tensor | None, prefix: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Prepend ``prefix`` meta tokens; move padding in front of them, as NVIDIA's code does.
        Returns hidden (B, L, D), kinds (B, L) in {PAD, META, REAL}, positions (B, L) and origin
        (B, L): the input index of each position (-1 for meta tokens)."""
        B, T, _ = embeds.shape
        kinds = torch.full((B, T), REAL, dtype=torch.long, device=embeds.device)
        if attention_mask is not None:
            kinds = torch.where(attention_mask[:, -T:].bool(), kinds, torch.full_like(kinds, PAD))
        origin = torch.arange(T, device=embeds.device).expand(B, -1)  # (B, T)
        hidden = embeds
        if prefix:
            mem = self.memory_tokens.to(embeds.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, M, D)
            hidden = torch.cat([mem, embeds], dim=1)  # (B, M + T, D)
            kinds = torch.cat([kinds.new_full((B, prefix), META), kinds], dim=1)  # (B, M + T)
            origin = torch.cat([origin.new_full((B, prefix), -1), origin], dim=1)
        # Positions count meta and real tokens only, so a left-padded row gets the positions it would
        # have unpadded (NVIDIA's code lets pads take positions, which shifts the real tokens).
        positions = ((kinds != PAD).long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L), from 0 in this forward
        if prefix and bool((kinds == PAD).any()):
            order = torch.argsort((kinds != PAD).long(), dim=1, stable=True)  # pads first, order kept
            hidden = hidden.gather(1, order[..., None].expand_as(hidden))
            kinds, positions, origin = kinds.gather(1, order), positions.gather(1, order), origin.gather(1, order)
        return hidden, kinds, positions, origin

    def _masks(self, q_kinds: Tensor, past: HymbaCache | None, past_len: int) -> tuple[Tensor, Tensor, Tensor]:
        """Boolean (B, 1, L, S) masks for global and sliding-window layers, and all key kinds (B, S)."""
        prev = getattr(past, "key_kinds", None) if past is not None else None
        k_kinds = torch.cat([prev, q_kinds], dim=1) if prev is not None else q_kinds  # (B, S)
        L, S = q_kinds.shape[1], k_kinds.shape[1]
        qi = torch.arange(past_len, past_len + L, device=q_kinds.device)[:, None]  # (L, 1)
        kj = torch.arange(S, device=q_kinds.device)[None, :]  # (1, S)
        causal = (kj <= qi)[None]  # (1, L, S)
        keep = causal & (k_kinds != PAD)[:, None, :]  # (B, L, S)
        diagonal = (kj == qi)[None]  # every query may see itself (pad queries would otherwise see nothing)
        full = keep | diagonal
        window = self.config.sliding_window
        if window is None:
            swa = full
        else:
            near = (qi - kj <= window)[None]
            swa = (keep & (near | (k_kinds == META)[:, None, :])) | diagonal
        return full[:, None], swa[:, None], k_kinds

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: HymbaCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: HymbaCache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids (B, T) or inputs_embeds (B, T, D); attention_mask (B, T_seen + T) over input tokens
        only (meta tokens are handled here). Returns hidden states (B, T, D) of the input tokens; with
        ``output_hidden_states`` every entry of ``hidden_states`` covers the meta tokens too (B, M + T, D),
        as in NVIDIA's code. ``position_ids`` apply from the second forward of a sequence on; the first
        one numbers meta and input tokens itself (NVIDIA's code replaces given ones there too).
        ``cache`` is ``past_key_values`` under transformers 5.24's name."""
        past_key_values = past_key_values if past_key_values is not None else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, D)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = HymbaCache(self.config.num_hidden_layers)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        prefix = self.config.num_memory_tokens if past_len == 0 else 0
        hidden, kinds, positions, origin = self._pack(inputs_embeds, attention_mask, prefix)  # (B, L, D), (B, L) x3
        start = getattr(past_key_values, "next_position", None) if past_len else None  # (B,) or None
        if position_ids is None or prefix:
            # The forward that prepends the meta tokens numbers its positions itself: given ones cover
            # the input tokens only, and NVIDIA's code replaces them by 0..M+T-1 there too.
            position_ids = positions + (start[:, None] if start is not None else 0)  # (B, L)
        full, swa, key_kinds = self._masks(kinds, past_key_values, past_len)
        if past_key_values is not None and use_cache:
            past_key_values.key_kinds = key_kinds

        token_mask = (kinds != PAD) if bool((kinds == PAD).any()) else None  # (B, L)
        reuse = self.config.kv_reuse_layers()
        produced: dict[int, tuple[Tensor, Tensor]] = {}
        all_hidden: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden)
            use_swa = self.config.uses_sliding_window(i)
            hidden, produced[i] = layer(
                hidden, attention_mask=swa if use_swa else full, position_ids=position_ids,
                past_key_value=past_key_values, use_cache=bool(use_cache),
                kv_last_layer=produced.get(reuse[i]) if i in reuse else None, use_swa=use_swa, token_mask=token_mask,
            )
        hidden = self.final_layernorm(hidden)
        if output_hidden_states:  # meta tokens included, like every other entry (and NVIDIA's last one)
            all_hidden.append(hidden)
        if prefix:  # drop the meta tokens, back to the input order
            T = inputs_embeds.shape[1]
            order = torch.argsort(torch.where(origin < 0, origin.new_full((), hidden.shape[1]), origin), dim=1)[:, :T]
            hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, T, D)
        if past_key_values is not None and use_cache:
            past_key_values.advance(kinds.shape[1], inputs_embeds.shape[1])
            past_key_values.next_position = (start if start is not None else 0) + (kinds != PAD).sum(dim=1)
        out = BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=tuple(all_hidden) if output_hidden_states
                                      else None, **{CACHE_FIELD: past_key_values if use_cache else None})
        return out if return_dict is not False else out.to_tuple()


class HymbaForCausalLM(HymbaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HymbaConfig) -> None:
        super().__init__(config)
        self.model = HymbaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward creates its own HymbaCache

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: HymbaCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: HymbaCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        hidden = out.last_hidden_state  # (B, T, D)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden).float()  # (B, T, V)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: HymbaCache | None = None,
                                      attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
                                      use_cache: bool = True, cache: HymbaCache | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen; positions and meta tokens are the model's business.
        ``cache``: transformers 5.24's name for ``past_key_values``."""
        past_key_values = past_key_values if past_key_values is not None else cache
        seen = past_key_values.real_tokens if isinstance(past_key_values, HymbaCache) else 0
        inputs: dict[str, Any] = {"attention_mask": attention_mask, "past_key_values": past_key_values,
                                  "use_cache": use_cache}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
