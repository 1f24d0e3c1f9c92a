"""lm-eval over a retrofitted model: HFLM(pretrained=model), HFLM(pretrained=DIR, trust_remote_code=True) and
``resona-adapt eval --task lm-eval``, on a tiny local multiple-choice task (no download)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from click.testing import CliRunner

from helpers.remote_support import saved_checkpoint, tiny_tokenizer, use_tmp_modules_cache
from resona_adapt import load_retrofitted
from resona_adapt.cli.main import cli

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install -e '.[lm-eval]')")
DOCS = [  # contexts long enough for the branches (chunks of 4) to retrieve from earlier chunks
    {"context": "t1 t2 t3 t4 t5 t6 t7 t8 t1 t2 t3 t4 t5 t6", "choices": ["t7", "t10", "t11"], "answer": 0},
    {"context": "t5 t9 t3 t20 t21 t22 t23 t24 t5 t9 t3 t20 t21", "choices": ["t22", "t30", "t31"], "answer": 0},
    {"context": "t12 t13 t14 t15 t16 t17 t18 t19 t12 t13 t14 t15", "choices": ["t16", "t40", "t41"], "answer": 0},
    {"context": "t33 t34 t35 t36 t37 t38 t39 t40 t33 t34 t35", "choices": ["t36", "t2", "t3"], "answer": 0},
]
TASK = """task: tiny_recall
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    use_tmp_modules_cache(tmp_path, monkeypatch)
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "tiny_recall.yaml").write_text(TASK.format(data=tasks / "data.jsonl"))
    return saved_checkpoint(tmp_path, "mamba2"), tasks


def logliks(row: dict) -> list[float]:
    """Per (document, choice) log-likelihoods of one lm-eval result row (with log_samples)."""
    return [resp[0][0] for s in sorted(row["samples"], key=lambda s: s["doc_id"]) for resp in s["resps"]]


def by_hand(model, tok) -> list[float]:
    """log p(choice | context) for every document and choice, straight from the model's logits."""
    out = []
    for doc in DOCS:
        context = tok(doc["context"])["input_ids"]
        for choice in doc["choices"]:
            target = tok(choice)["input_ids"]
            ids = torch.tensor([context + target])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, len(context) - 1:-1].double(), dim=-1)
            out.append(sum(logp[i, t].item() for i, t in enumerate(target)))
    return out


@needs_lm_eval
def test_hflm_of_the_model_uses_the_branches(setup):
    from transformers import AutoModelForCausalLM

    from resona_adapt.evaluation.harness import run_lm_eval

    path, tasks = setup
    model, tok = load_retrofitted(path), tiny_tokenizer()
    rows = run_lm_eval(model, tok, ["tiny_recall"], tasks, variants=("model", "base"), batch_size=2, log_samples=True)
    (ours,), (base,) = [[r for r in rows if r["variant"] == v] for v in ("model", "base")]
    assert ours["documents"] == base["documents"] == len(DOCS)
    ll_ours, ll_base = logliks(ours), logliks(base)
    assert len(ll_ours) == 3 * len(DOCS)
    torch.testing.assert_close(torch.tensor(ll_ours), torch.tensor(by_hand(model, tok)), rtol=0, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()  # transformers' own base: what lm-eval saw bypassed
    torch.testing.assert_close(torch.tensor(ll_base), torch.tensor(by_hand(plain, tok)), rtol=0, atol=1e-4)
    assert min(abs(a - b) for a, b in zip(ll_ours, ll_base)) > 1e-3  # the branches change every score


@needs_lm_eval
def test_hflm_of_the_path_with_trust_remote_code_is_the_retrofitted_model(setup):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from resona_adapt.evaluation.harness import run_lm_eval, task_manager

    path, tasks = setup
    lm = HFLM(pretrained=str(path), trust_remote_code=True, batch_size=2, device="cpu")
    out = simple_evaluate(model=lm, tasks=["tiny_recall"], task_manager=task_manager(tasks), bootstrap_iters=0)
    (ours,) = run_lm_eval(load_retrofitted(path), tiny_tokenizer(), ["tiny_recall"], tasks, batch_size=2,
                          log_samples=True)
    assert logliks({"samples": out["samples"]["tiny_recall"]}) == logliks(ours)


@needs_lm_eval
def test_cli_lm_eval_json_has_model_and_base_rows(setup):
    path, tasks = setup
    res = CliRunner().invoke(cli, ["eval", "--task", "lm-eval", "--tasks", "tiny_recall", "--include-path", str(tasks),
                                   "--model", str(path), "--batch-size", "2", "--limit", "3", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["task"] == "lm-eval" and data["retrofitted"] is True
    assert [(r["variant"], r["task"], r["documents"]) for r in data["results"]] == [
        ("model", "tiny_recall", 3), ("base", "tiny_recall", 3)]
    assert all(0.0 <= r["acc"] <= 1.0 and "acc_stderr" in r for r in data["results"])


@needs_lm_eval
def test_cli_lm_eval_refuses_what_it_cannot_run(setup, tmp_path):
    path, tasks = setup
    base = ["eval", "--task", "lm-eval", "--model", str(path)]
    cases = [
        ([*base, "--tasks", "nope", "--include-path", str(tasks)], "nope not defined under"),
        ([*base, "--tasks", "tiny_recall"], "--include-path"),
        ([*base, "--include-path", str(tasks)], "needs --tasks"),
        ([*base, "--tasks", "tiny_recall", "--include-path", str(tmp_path / "missing")], "no such directory"),
        (["eval", "--task", "ppl", "--model", str(path), "--tasks", "x"], "use them with --task lm-eval"),
    ]
    (tasks / "hub.yaml").write_text("task: from_hub\ndataset_path: someone/not-here\ntest_split: test\n"
                                    "output_type: loglikelihood\ndoc_to_text: x\ndoc_to_target: y\n")
    cases.append(([*base, "--tasks", "from_hub", "--include-path", str(tasks)], "could not load the data"))
    for args, message in cases:
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (args, res.output)


def test_without_lm_eval_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # find_spec then says "not installed"
    res = CliRunner().invoke(cli, ["eval", "--task", "lm-eval", "--tasks", "x", "--include-path", str(tmp_path),
                                   "--model", "tiny-mamba"])
    assert res.exit_code == 2 and "pip install 'resona-adapt[lm-eval]'" in res.output
    assert len(res.output.strip().splitlines()) == 1
