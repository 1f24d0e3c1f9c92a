"""`resona-adapt train` through click's CliRunner: MQAR, local text data, resume, and the errors users hit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from resona_adapt import load_model, load_retrofitted
from resona_adapt.cli.main import cli
from resona_adapt.training import DataError, load_text_dataset, task_datasets

WORDS = "the cat sat on a mat what did answer is yes no".split()


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def save_base(path, vocab: int = 128, tokenizer: bool = False):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=4)).save_pretrained(path)
    if tokenizer:
        save_tokenizer(path)
    return path


def save_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)


MQAR = ["--task", "mqar", "--seq-len", "32", "--kv-pairs", "4", "--batch-size", "8", "--lr", "2e-3",
        "--lr-multiplier", "5", "--eval-examples", "32", "--no-progress"]
RESONA = ["--layers", "-1", "--chunk-size", "2", "--top-k", "1", "--train-top-k", "4", "--num-heads", "1",
          "--head-dim", "32", "--search-dim", "32"]


def mqar_eval_loss(model) -> float:
    _, eval_ds = task_datasets("mqar", 128, 32, 0, 64, seed=7, num_kv_pairs=4)
    ids = torch.stack([e["input_ids"] for e in eval_ds])
    labels = torch.stack([e["labels"] for e in eval_ds])
    with torch.no_grad():
        return model(ids, labels=labels).loss.item()


def test_train_on_mqar_lowers_the_loss(runner, tmp_path):
    base = save_base(tmp_path / "base")
    res = runner.invoke(cli, ["inject", "--model", str(base), *RESONA, "--output", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["train", "--model", str(tmp_path / "out"), *MQAR, "--steps", "25", "--eval-every", "10",
                              "--output", str(tmp_path / "trained")])
    assert res.exit_code == 0, res.output
    assert "training summary" in res.output and "final loss" in res.output and "eval strict" in res.output
    assert "tokens/s" in res.output
    before, after = load_retrofitted(tmp_path / "out"), load_retrofitted(tmp_path / "trained")
    assert mqar_eval_loss(after) < mqar_eval_loss(before) - 0.5


def test_train_with_the_search_loss_records_it_and_refuses_plain_text(runner, tmp_path):
    base = save_base(tmp_path / "base", tokenizer=True)
    res = runner.invoke(cli, ["train", "--model", str(base), *MQAR, *RESONA, "--steps", "3", "--search-loss-weight", "0.5",
                              "--output", str(tmp_path / "trained")])
    assert res.exit_code == 0, res.output
    assert load_model(str(tmp_path / "trained")).config.resona["training"][-1]["search_loss_weight"] == 0.5
    (tmp_path / "plain.txt").write_text(" ".join(WORDS * 20))
    res = runner.invoke(cli, ["train", "--model", str(base), "--data", str(tmp_path / "plain.txt"), *RESONA,
                              "--seq-len", "32", "--steps", "1", "--no-progress", "--search-loss-weight", "1",
                              "--output", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "the search loss has nothing to supervise" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists()
    res = runner.invoke(cli, ["train", "--model", str(base), *MQAR, "--search-loss-weight", "-1", "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--search-loss-weight" in res.output


def test_train_retrofits_a_base_and_resumes(runner, tmp_path):
    base = save_base(tmp_path / "base")
    out = tmp_path / "t"
    args = ["train", "--model", str(base), *MQAR, *RESONA, "--save-every", "2", "--output", str(out)]
    res = runner.invoke(cli, [*args, "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t.run" / "checkpoint-2" / "resona_checkpoint.json").is_file()
    res = runner.invoke(cli, [*args, "--steps", "4"])
    assert res.exit_code == 2 and "already exists and is not empty; pass --overwrite" in res.output
    shutil.rmtree(out)
    res = runner.invoke(cli, [*args, "--steps", "4"])  # the same run dir again, without --resume
    assert res.exit_code == 2 and "holds checkpoints of an earlier run" in res.output and "--resume" in res.output
    res = runner.invoke(cli, [*args, "--steps", "4", "--resume"])
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and "checkpoint-2" in res.output
    state = json.loads((tmp_path / "t.run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_train_on_local_jsonl_with_the_checkpoint_tokenizer(runner, tmp_path):
    base = save_base(tmp_path / "base", tokenizer=True)
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "what did the cat sat on", "completion": "a mat"}, {"text": "the cat sat on a mat"}] * 8
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = runner.invoke(cli, ["train", "--model", str(base), "--data", str(data), "--eval-data", str(data),
                              *RESONA, "--steps", "2", "--batch-size", "4", "--no-progress",
                              "--output", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "tokenizer.json").is_file()  # the tokenizer travels with the checkpoint


def test_text_data_masks_the_prompt_and_names_bad_lines(tmp_path):
    save_tokenizer(tmp_path / "tok")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "what did the cat", "completion": "sat"}) + "\n")
    ex = load_text_dataset(data, tok, seq_len=16)[0]
    assert ex["input_ids"].tolist() == [8, 9, 2, 3, 4, 1]  # prompt, completion, <eos>
    assert ex["labels"].tolist() == [-100, -100, -100, -100, 4, 1]  # loss on the completion only
    text = tmp_path / "d.txt"
    text.write_text(" ".join(WORDS * 3))
    blocks = load_text_dataset(text, tok, seq_len=8)
    assert len(blocks) == 5 and blocks[0]["labels"].tolist() == blocks[0]["input_ids"].tolist()
    data.write_text('{"text": "the cat"}\n{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2 needs a string field 'text', or string fields 'prompt' and 'completion'"):
        load_text_dataset(data, tok, seq_len=16)
    data.write_text('{"text": "the cat"}\nnot json\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2 is not valid JSON"):
        load_text_dataset(data, tok, seq_len=16)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--task", "mqar", "--seq-len", "256"], "needs a vocabulary larger than 256 tokens"),
        (["--task", "mqar", "--seq-len", "32", "--kv-pairs", "16"], "4 * num_kv_pairs <= seq_len"),
        (["--task", "nope"], "unknown task 'nope'; built-in tasks: mqar"),
        ([], "give exactly one of --data FILE or --task NAME"),
        (["--data", "DATA"], "has no tokenizer files"),
        (["--task", "mqar", "--seq-len", "32", "--kv-pairs", "4", "--unfreeze-layers", "7"], "cannot unfreeze layer 7"),
        (["--task", "mqar", "--seq-len", "32", "--kv-pairs", "4", "--filler", "5-2"], "filler must be"),
        (["--task", "mqar", "--seq-len", "32", "--kv-pairs", "4", "--filler", "0-40"], "longer than the sequence"),
        (["--task", "mqar", "--seq-len", "32", "--kv-pairs", "4", "--bos-id", "64"], "bos_id 64 is outside"),
    ],
)
def test_train_bad_input_is_a_clear_error(runner, tmp_path, args, needle):
    base = save_base(tmp_path / "base", vocab=64)
    (tmp_path / "d.txt").write_text("hello")
    args = [str(tmp_path / "d.txt") if a == "DATA" else a for a in args]
    res = runner.invoke(cli, ["train", "--model", str(base), *args, "--steps", "1", "--no-progress",
                              "--output", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert not (tmp_path / "o").exists()


def test_train_refuses_new_resona_options_for_a_retrofitted_model(runner, tmp_path):
    res = runner.invoke(cli, ["inject", "--model", str(save_base(tmp_path / "base")), "--output", str(tmp_path / "r")])
    assert res.exit_code == 0
    res = runner.invoke(cli, ["train", "--model", str(tmp_path / "r"), "--task", "mqar", "--seq-len", "32",
                              "--chunk-size", "8", "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "already retrofitted" in res.output
    assert load_model(str(tmp_path / "r")).config.resona["config"]["chunk_size"] == 64


def test_jsonl_errors_name_the_file_line_after_blank_lines(tmp_path):
    from resona_adapt.evaluation.qa import load_qa_jsonl
    from resona_adapt.training.data import read_jsonl

    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n\n{"txt": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:4 needs a string field 'text'"):
        read_jsonl(tmp_path / "d.jsonl")
    (tmp_path / "q.jsonl").write_text('{"question": "q", "answer": "a"}\n\n[1]\n')
    with pytest.raises(ValueError, match=r"q\.jsonl:3 is not a JSON object"):
        load_qa_jsonl(tmp_path / "q.jsonl")
    (tmp_path / "q.jsonl").write_text('\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl:2 needs a 'question' and an 'answers'"):
        load_qa_jsonl(tmp_path / "q.jsonl")


def test_moved_names_stay_importable():
    import importlib
    import warnings

    from resona_adapt import demo, recipes
    from resona_adapt.evaluation import mqar_eval
    from resona_adapt.training import groups

    mqar = importlib.import_module("resona_adapt.tasks.mqar")  # the package exports the function `mqar`

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from resona_adapt.training import tasks as old_tasks
        old_parse = groups.parse_layers
    assert old_tasks.model_vocab_size is mqar.model_vocab_size is mqar_eval.model_vocab_size
    assert old_tasks.task_datasets is task_datasets
    assert mqar_eval.TRAIN_SEED_BASE == mqar.TRAIN_SEED_BASE and old_parse("1,-1") == [1, -1] and old_parse(None) == []
    assert demo.recipe_datasets is recipes.recipe_datasets and demo.recipe_train_config is recipes.recipe_train_config
