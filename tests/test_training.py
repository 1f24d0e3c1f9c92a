"""train(): transformers' Trainer under the hood, the frozen base, checkpoints, resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM, TrainerCallback

from resona_adapt import CheckpointError, ResonaConfig, load_retrofitted, param_groups, resona_state_dict, retrofit
from resona_adapt.training import TrainConfig, task_datasets, train
from resona_adapt.training.checkpoints import MARKER_FILE, TRAINABLE_FILE, last_complete_checkpoint

MQAR_CFG = ResonaConfig(chunk_size=2, top_k=1, train_top_k=4, num_heads=1, head_dim=32, search_dim=32)


def mqar_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Mamba (vocabulary 128) with one Resona branch on its last layer."""
    torch.manual_seed(seed)
    model = MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4))
    return retrofit(model, layers=[-1], config=MQAR_CFG)


@pytest.fixture(scope="module")
def mqar_data():
    return task_datasets("mqar", vocab_size=128, seq_len=32, num_train=256, num_eval=32, num_kv_pairs=4)


def fast(**kw) -> TrainConfig:
    base = dict(lr=2e-3, lr_multiplier=5, steps=6, batch_size=8, log_every=1)
    return TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss_and_keeps_the_base_bit_identical(mqar_data, tmp_path):
    model = mqar_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_ds, eval_ds = mqar_data
    summary = train(model, train_ds, eval_ds, fast(steps=20, log_every=5, output=str(tmp_path / "out")))
    assert summary.steps == 20 and summary.final_loss < summary.first_loss
    assert summary.tokens == 20 * 8 * 32 and summary.tokens_per_second > 0
    assert {"loss", "accuracy", "strict"} <= set(summary.eval)
    assert not model.training
    for n, p in model.named_parameters():
        if ".resona." in n:
            continue
        assert torch.equal(p, before[n]), f"base parameter {n} changed"
        assert not p.requires_grad
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".resona." in n)
    loaded = load_retrofitted(tmp_path / "out")
    ids = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_unfrozen_layers_train_too(mqar_data):
    model = mqar_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, mqar_data[0], None, fast(steps=2, unfreeze_layers=[0]))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("backbone.layers.0.") for n in changed)
    assert all(".resona." in n or n.startswith("backbone.layers.0.") for n in changed)
    assert model.config.resona["base_trained"] == {"unfrozen_layers": [0], "lora": False}


class StopAt(TrainerCallback):
    """Simulates an interruption: stop the run after ``step`` (once the checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_reproduces_the_uninterrupted_loss_curve(mqar_data, tmp_path):
    train_ds, _ = mqar_data
    full_model = mqar_model()
    full = train(full_model, train_ds, None, fast(run_dir=str(tmp_path / "full"), save_every=3))

    cut_model = mqar_model()
    cut = train(cut_model, train_ds, None, fast(run_dir=str(tmp_path / "cut"), save_every=3), callbacks=[StopAt(3)])
    assert cut.steps == 3
    assert last_complete_checkpoint(tmp_path / "cut").name == "checkpoint-3"
    resumed_model = mqar_model()  # a fresh process would rebuild the model from --model
    resumed = train(resumed_model, train_ds, None, fast(run_dir=str(tmp_path / "cut"), save_every=3, resume=True))
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.steps == 6
    curve, cut_curve, resumed_curve = full.losses, cut.losses, resumed.losses
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    for step in (1, 2, 3):
        assert cut_curve[step] == pytest.approx(curve[step], rel=1e-6)
    for step in (4, 5, 6):
        assert resumed_curve[step] == pytest.approx(curve[step], rel=1e-5)
    a, b = resona_state_dict(full_model), resona_state_dict(resumed_model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_checkpoints_are_loadable_and_marked_complete(mqar_data, tmp_path):
    model = mqar_model()
    train(model, mqar_data[0], None, fast(steps=2, run_dir=str(tmp_path / "run"), save_every=2))
    ckpt = tmp_path / "run" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {TRAINABLE_FILE, MARKER_FILE, "config.json", "model.safetensors", "resona.safetensors",
            "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no staging left behind
    loaded = load_retrofitted(ckpt)
    a, b = resona_state_dict(loaded), resona_state_dict(model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # an adapter-format checkpoint holds only the Resona part
    train(mqar_model(), mqar_data[0], None, fast(steps=2, run_dir=str(tmp_path / "ad"), save_every=2,
                                                 checkpoint_format="adapter"))
    files = {p.name for p in (tmp_path / "ad" / "checkpoint-2").iterdir()}
    assert "resona_config.json" in files and "model.safetensors" not in files


def test_interrupted_or_foreign_checkpoints_are_refused(mqar_data, tmp_path):
    run = tmp_path / "run"
    train(mqar_model(), mqar_data[0], None, fast(steps=2, run_dir=str(run), save_every=2))
    (run / "checkpoint-2" / MARKER_FILE).unlink()  # as if the process died while writing it
    with pytest.raises(CheckpointError, match=r"no complete checkpoint .*interrupted while being written: checkpoint-2"):
        train(mqar_model(), mqar_data[0], None, fast(steps=4, run_dir=str(run), resume=True))
    (run / "checkpoint-2" / MARKER_FILE).write_text(json.dumps({"step": 2, "complete": True}))
    with pytest.raises(CheckpointError, match=rf"{TRAINABLE_FILE} was written by a different training setup"):
        train(mqar_model(), mqar_data[0], None, fast(steps=4, run_dir=str(run), resume=True, unfreeze_layers=[0]))
    data = (run / "checkpoint-2" / TRAINABLE_FILE).read_bytes()
    (run / "checkpoint-2" / TRAINABLE_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=rf"{TRAINABLE_FILE} is corrupt or truncated"):
        train(mqar_model(), mqar_data[0], None, fast(steps=4, run_dir=str(run), resume=True))


def test_trainer_uses_param_groups_with_two_lines(mqar_data, tmp_path):
    """The README's recipe: build AdamW over param_groups and hand it to a stock Trainer."""
    from transformers import Trainer, TrainingArguments

    from resona_adapt.training import PadCollator

    model = mqar_model()
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3, lr_multiplier=20), weight_decay=0.01)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                             report_to="none", disable_tqdm=True, lr_scheduler_type="constant",
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=mqar_data[0], data_collator=PadCollator(),
                      optimizers=(opt, None))
    trainer.train()
    assert {g["name"]: g["lr"] for g in trainer.optimizer.param_groups} == {"resona": 2e-2, "resona_no_decay": 2e-2}


def test_load_best_model_at_end_restores_the_best_checkpoint(mqar_data, tmp_path):
    from resona_adapt.files import load_tensors

    model = mqar_model()
    train(model, *mqar_data, fast(steps=4, run_dir=str(tmp_path / "run"), save_every=2, eval_every=2,
                                  extra_args={"load_best_model_at_end": True, "metric_for_best_model": "loss",
                                              "greater_is_better": True}))  # "best" = the earlier, worse step
    history = [e for e in json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
               if "eval_loss" in e]
    best = max(history, key=lambda e: e["eval_loss"])["step"]
    assert best == 2
    saved = load_tensors(tmp_path / "run" / f"checkpoint-{best}" / TRAINABLE_FILE)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in saved.items())
