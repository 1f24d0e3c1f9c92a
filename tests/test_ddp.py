"""Data-parallel training with nothing project-specific: torchrun, 2 CPU processes (gloo), same result as 1 process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import resona_adapt
from resona_adapt import load_retrofitted, resona_state_dict
from resona_adapt.cli.main import cli

INFRA_ERROR = re.compile(r"(?i)address already in use|EADDRINUSE|RendezvousConnectionError|RendezvousTimeoutError")
ROOT = str(Path(resona_adapt.__file__).resolve().parent.parent)
TRAIN = ["--task", "mqar", "--seq-len", "32", "--kv-pairs", "4", "--steps", "4", "--lr", "2e-3", "--lr-multiplier",
         "5", "--eval-examples", "16", "--log-every", "1", "--no-progress"]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4)).save_pretrained(
        tmp_path / "base")
    runner = CliRunner()
    res = runner.invoke(cli, ["inject", "--model", str(tmp_path / "base"), "--layers", "-1", "--chunk-size", "2",
                              "--num-heads", "1", "--head-dim", "32", "--search-dim", "32", "--output", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output

    res = runner.invoke(cli, ["train", "--model", str(tmp_path / "r"), *TRAIN, "--batch-size", "8",
                              "--output", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "resona_adapt.cli.main", "train", "--model", str(tmp_path / "r"), *TRAIN, "--batch-size", "4",
           "--output", str(tmp_path / "two")]
    for _ in range(2):  # one retry when the launcher's rendezvous loses a port race with another job
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        if proc.returncode == 0 or not INFRA_ERROR.search(proc.stderr):
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(2 processes)" in proc.stderr and proc.stdout.count("training summary") == 1  # one summary, rank 0

    start = resona_state_dict(load_retrofitted(tmp_path / "r"))
    one = resona_state_dict(load_retrofitted(tmp_path / "one"))
    two = resona_state_dict(load_retrofitted(tmp_path / "two"))
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # training moved the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=f"tensor {k} differs")
