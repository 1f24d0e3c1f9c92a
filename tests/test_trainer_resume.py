"""A stock transformers Trainer saves a retrofitted model through its save_pretrained (the merged
checkpoint) and resumes from it bit for bit: base and Resona weights, optimizer and schedule."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from helpers.models import VOCAB, build_tiny
from helpers.matrix import CFG, logits
from resona_adapt import ResonaConfig, load_retrofitted, param_groups, resona_state_dict, retrofit


class Tokens(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (16, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _fresh(seed: int) -> torch.nn.Module:
    model = build_tiny("mamba")
    torch.manual_seed(seed)  # the branches' initial weights: a resume must not depend on them
    retrofit(model, layers=[0, -1], config=ResonaConfig(**CFG))
    return model.train()


def _trainer(model, out, **kw):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, save_strategy="steps",
                             per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="linear",
                             use_cpu=True, report_to=[], logging_steps=1, seed=0, data_seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, **kw)
    opt = torch.optim.AdamW(param_groups(model, lr=1e-2, lr_multiplier=2), weight_decay=0.01)
    return Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))


def test_stock_trainer_resume_is_bit_exact(tmp_path):
    full = _fresh(seed=1)
    _trainer(full, tmp_path / "full").train()

    _trainer(_fresh(seed=1), tmp_path / "cut").train()  # leaves checkpoint-2 and checkpoint-4
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert (checkpoint / "resona.safetensors").is_file()  # the Trainer saved the merged checkpoint
    resumed = _fresh(seed=2)  # other initial branches: everything must come from the checkpoint
    _trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))

    a, b = resona_state_dict(full), resona_state_dict(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, VOCAB, (2, 15))
    full.eval(), resumed.eval()
    assert torch.equal(logits(resumed, ids), logits(full, ids))
    # and the Trainer's checkpoints are ordinary merged checkpoints
    assert torch.equal(logits(load_retrofitted(tmp_path / "full" / "checkpoint-4"), ids), logits(full, ids))


def test_load_state_dict_of_a_merged_checkpoint_restores_other_families(tmp_path):
    """What a stock Trainer's resume does, on Hymba's attention swap and RWKV's rescaled layers."""
    from safetensors.torch import load_file

    from helpers.hymba_support import build_hymba
    from helpers.matrix import randomize_resona
    from helpers.tiny_families import build_family

    cases = {"hymba": (lambda: build_hymba(), dict(replace_attention=True), [1]),
             "rwkv": (lambda: build_family("rwkv"), {}, [2, 3])}
    for name, (build, extra, layers) in cases.items():
        model = build()
        retrofit(model, layers=layers, config=ResonaConfig(**CFG, **extra))
        randomize_resona(model)
        ids = torch.randint(3, VOCAB, (2, 13))
        expected = logits(model, ids)
        model.save_pretrained(tmp_path / name)
        torch.manual_seed(7)
        fresh = build()
        retrofit(fresh, layers=layers, config=ResonaConfig(**CFG, **extra))
        with torch.no_grad():  # other base weights too: everything must come from the file
            for p in fresh.parameters():
                p.add_(0.01)
        result = fresh.load_state_dict(load_file(str(tmp_path / name / "model.safetensors")), strict=False)
        assert not result.unexpected_keys, (name, result.unexpected_keys)
        assert all("base_layer" not in k and "resona" not in k for k in result.missing_keys), (name, result.missing_keys)
        assert torch.equal(logits(fresh.eval(), ids), expected), name


def test_resona_trainer_saves_the_tokenizer_and_one_copy_of_the_weights(tmp_path):
    """With processing_class=tok, checkpoints and save_model() hold the tokenizer (as a stock Trainer
    writes it); trainable.safetensors (what a resume reads) is in checkpoint-N only."""
    import pytest
    from transformers import AutoTokenizer, TrainingArguments, default_data_collator

    from resona_adapt import CheckpointError
    from resona_adapt.training import ResonaTrainer
    from resona_adapt.training.checkpoints import MARKER_FILE, TRAINABLE_FILE
    from helpers.text_tokenizers import word_tokenizer

    def trainer(model, out):
        args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, save_strategy="steps",
                                 per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True, report_to=[],
                                 seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
        return ResonaTrainer(model=model, args=args, train_dataset=Tokens(), processing_class=word_tokenizer(),
                             data_collator=default_data_collator)

    model = _fresh(seed=1)
    run = trainer(model, tmp_path / "run")
    run.train()
    run.save_model(str(tmp_path / "final"))
    text = "w3 w17 w5 w63"
    for directory in (tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4", tmp_path / "final"):
        files = {p.name for p in directory.iterdir()}
        assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors", "resona.safetensors",
                "README.md"} <= files, directory
        assert AutoTokenizer.from_pretrained(directory)(text)["input_ids"] == [3, 17, 5, 63]
        assert (TRAINABLE_FILE in files) == (directory.name != "final"), directory
    assert MARKER_FILE in {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    ids = torch.randint(0, VOCAB, (2, 15))
    model.eval()
    assert torch.equal(logits(load_retrofitted(tmp_path / "final"), ids), logits(model, ids))

    resumed = _fresh(seed=2)
    trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    resumed.eval()
    assert torch.equal(logits(resumed, ids), logits(model, ids))
    with pytest.raises(CheckpointError, match=r"has no trainable.safetensors: it is not a training checkpoint"):
        trainer(_fresh(seed=2), tmp_path / "again").train(resume_from_checkpoint=str(tmp_path / "final"))
