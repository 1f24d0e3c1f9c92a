"""resona-adapt's own Hymba: loads the official layout, meta tokens, attention masks, KV reuse, decoding."""

from __future__ import annotations

import pytest
import torch

from helpers.hymba_support import M, VOCAB, build_hymba, write_official_checkpoint
from resona_adapt import load_model
from resona_adapt.compat import CACHE_FIELD
from resona_adapt.models.hymba import HymbaForCausalLM
from resona_adapt.models.hymba.modeling import META, PAD, REAL


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("with_lm_head", [False, True])
def test_loads_a_checkpoint_in_the_official_layout(tmp_path, with_lm_head):
    source = build_hymba()
    ckpt = write_official_checkpoint(source, tmp_path / "hymba", with_lm_head=with_lm_head)
    loaded = load_model(str(ckpt))
    assert type(loaded) is HymbaForCausalLM and loaded.config.num_memory_tokens == M
    assert loaded.config.kv_reuse_group == [[1, 2]] and loaded.config.global_attn_idx == [0, 3, 5]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.randint(3, VOCAB, (2, 15))
    assert torch.equal(_logits(loaded, ids), _logits(source, ids))


def test_kv_reuse_and_projection_sizes_follow_the_config():
    model = build_hymba()
    producer, consumer = model.model.layers[1].mamba, model.model.layers[2].mamba
    # in_proj: queries (D) + keys (Hkv/H * D) + values (Hkv/H * 2D) + SSM input (2D) + gate (2D)
    assert producer.in_proj.weight.shape == (32 + 16 + 32 + 64 + 64, 32)
    assert consumer.in_proj.weight.shape == (32 + 64 + 64, 32) and consumer.reuse_kv
    seen = {}
    producer.self_attn.register_forward_hook(lambda m, a, k, out: seen.__setitem__("made", out[1]), with_kwargs=True)
    consumer.self_attn.register_forward_hook(lambda m, a, k, out: seen.__setitem__("used", k["kv_last_layer"]),
                                             with_kwargs=True)
    _logits(model, torch.randint(3, VOCAB, (1, 9)))
    assert seen["used"] is seen["made"]


def test_attention_masks_window_meta_and_causality():
    model = build_hymba()
    kinds = torch.tensor([[META] * M + [REAL] * 10])
    full, swa, _ = model.model._masks(kinds, None, 0)
    L = M + 10
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    assert torch.equal(full[0, 0], k <= q)
    expected = (k <= q) & ((q - k <= 6) | (k < M))
    assert torch.equal(swa[0, 0], expected)
    # a pad key is never seen, except by the pad query itself
    kinds = torch.tensor([[PAD, PAD] + [META] * M + [REAL] * 8])
    full, swa, _ = model.model._masks(kinds, None, 0)
    assert not full[0, 0, 5:, :2].any() and full[0, 0, 1, 1]


def test_meta_tokens_are_prepended_and_positions_count_them():
    model = build_hymba()
    ids = torch.randint(3, VOCAB, (1, 8))
    base = _logits(model, ids)
    assert base.shape == (1, 8, VOCAB)  # the meta tokens are not returned
    with torch.no_grad():
        model.model.memory_tokens.add_(1.0)
    assert not torch.allclose(_logits(model, ids), base)  # ... but they are used
    positions = []
    rotary = model.model.layers[0].mamba.self_attn.rotary_emb
    rotary.register_forward_hook(lambda m, args, out: positions.append(args[1]))
    _logits(model, ids)
    assert positions[0].tolist() == [list(range(M + 8))]


def test_left_padding_keeps_the_real_tokens_exact():
    model = build_hymba()
    ids = torch.randint(3, VOCAB, (1, 7))
    alone = _logits(model, ids)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    out = _logits(model, padded, attention_mask=mask)
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-5, atol=1e-5)  # other shapes: round-off only


def test_cached_decoding_equals_one_full_forward():
    model = build_hymba()
    ids = torch.randint(3, VOCAB, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :2] = 0  # the second row is left-padded
    full = _logits(model, ids, attention_mask=mask, use_cache=False)
    with torch.no_grad():
        out = model(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(7, 16):  # crosses the sliding window (6) and the reuse group
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1)[:, 2:], full[:, 2:], rtol=1e-5, atol=1e-5)
    assert cache.seen_tokens == M + 16 and cache.real_tokens == 16 and cache.next_position.tolist() == [M + 16, M + 14]


def test_generate_is_the_greedy_path():
    model = build_hymba()
    prompt = torch.randint(3, VOCAB, (2, 5))
    # use_cache=True: the released config (and so the tiny one) says use_cache=False
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, _logits(model, ids, use_cache=False)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_cache_mask_sizes_cover_the_whole_kept_history():
    """transformers' mask helpers ask the cache how many key positions the next step sees."""
    model = build_hymba()
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = getattr(out, CACHE_FIELD)
    kept = next(k for k in cache.key_cache if k is not None).shape[-2]  # meta tokens + 7 positions
    for layer in range(model.config.num_hidden_layers):
        assert cache.get_mask_sizes(1, layer) == (kept + 1, 0)


# A remote-code model written the way NVIDIA's modeling_hymba.py builds its rotary tables (in __init__,
# as a non-persistent buffer); not NVIDIA's code. transformers 5 instantiates on the meta device and
# loads only the checkpoint's tensors, which left those tables uninitialised (examples/verify_hymba_upstream.py).
_REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class TinyRemoteHymbaConfig(PretrainedConfig):
    model_type = "hymba"

    def __init__(self, hidden_size=16, num_attention_heads=2, rope_theta=10000.0, vocab_size=32, **kwargs):
        self.hidden_size, self.num_attention_heads = hidden_size, num_attention_heads
        self.rope_theta, self.vocab_size = rope_theta, vocab_size
        super().__init__(**kwargs)
'''
_REMOTE_MODEL = '''
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_hymba import TinyRemoteHymbaConfig


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, config, dim, base=10000, device=None):
        super().__init__()
        self.config, self.dim, self.base = config, dim, base
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)


class HymbaForCausalLM(PreTrainedModel):
    config_class = TinyRemoteHymbaConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = LlamaRotaryEmbedding(config, config.hidden_size // config.num_attention_heads,
                                               base=config.rope_theta)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return self.embed_tokens(input_ids)
'''


def test_trust_remote_code_hymba_gets_its_rotary_tables(tmp_path):
    import json

    from safetensors.torch import save_file

    remote = tmp_path / "tiny_remote_hymba"
    remote.mkdir()
    (remote / "configuration_hymba.py").write_text(_REMOTE_CONFIG)
    (remote / "modeling_hymba.py").write_text(_REMOTE_MODEL)
    (remote / "config.json").write_text(json.dumps({
        "model_type": "hymba", "architectures": ["HymbaForCausalLM"], "hidden_size": 16, "num_attention_heads": 2,
        "rope_theta": 500.0, "vocab_size": 32,
        "auto_map": {"AutoConfig": "configuration_hymba.TinyRemoteHymbaConfig",
                     "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM"}}))
    save_file({"embed_tokens.weight": torch.randn(32, 16)}, str(remote / "model.safetensors"))
    model = load_model(str(remote), trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules")  # the remote class, not resona-adapt's Hymba
    expected = 1.0 / (500.0 ** (torch.arange(0, 8, 2).float() / 8))
    assert torch.equal(model.rotary_emb.inv_freq, expected)


def test_num_experts_in_the_config_builds_one_mlp_like_the_released_code():
    """NVIDIA's HymbaModel passes num_experts=1 to every decoder layer whatever config.num_experts says;
    a config with num_experts > 1 must still load a released checkpoint (one MLP, no router)."""
    many = build_hymba(num_experts=4, num_experts_per_tok=2)
    one = build_hymba()
    assert all(layer.moe.router is None and len(layer.moe.experts) == 1 for layer in many.model.layers)
    assert many.state_dict().keys() == one.state_dict().keys()
    many.load_state_dict(one.state_dict())
    ids = torch.randint(3, VOCAB, (2, 9))
    assert torch.equal(_logits(many, ids), _logits(one, ids))


def test_position_ids_on_the_first_forward_are_the_models_own():
    """Given position ids cover the input tokens only; the first forward also runs the meta tokens and
    numbers all of them itself, as NVIDIA's code does (it used to fail with a shape error)."""
    model = build_hymba()
    ids = torch.randint(3, VOCAB, (2, 9))
    given = torch.arange(9)[None].expand(2, -1)
    assert torch.equal(_logits(model, ids, position_ids=given), _logits(model, ids))


def test_hidden_states_cover_the_meta_tokens_in_every_entry():
    model = build_hymba()
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        out = model.model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, M + 9, model.config.hidden_size) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[-1][:, M:], out.last_hidden_state)  # the final norm's output
