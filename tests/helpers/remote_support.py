"""Test helper (not a test file): a tiny word tokenizer and a retrofitted tiny checkpoint that ships it,
for the tests of path-based loading (test_remote_code.py) and lm-eval (test_lm_eval.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers.models import VOCAB, build_tiny, randomize_resona
from resona_adapt import ResonaConfig, retrofit

CFG = ResonaConfig(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16)


def tiny_tokenizer():
    """Word-level tokenizer over the tiny vocabulary ("t0".."t63", "t63" doubling as end of text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token=f"t{VOCAB - 1}")


def saved_checkpoint(root: Path, family: str) -> Path:
    """A retrofitted tiny model of ``family`` with live branches, saved merged (with the tokenizer) at root/family."""
    model = build_tiny(family)
    retrofit(model, layers=[0, -1], config=CFG)
    randomize_resona(model)
    path = Path(root) / family
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def use_tmp_modules_cache(tmp_path: Path, monkeypatch) -> None:
    """transformers copies a checkpoint's code into HF_MODULES_CACHE (read at import): point it at tmp_path."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
