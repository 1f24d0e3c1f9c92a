"""FSDP2 (torch's ``fully_shard``) on CPU with gloo, 2 processes: a retrofitted model trains sharded as it does
whole. This file is also the worker script that torchrun runs (``python tests/test_fsdp.py OUT``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
INFRA_ERROR = re.compile(r"(?i)address already in use|EADDRINUSE|RendezvousConnectionError|RendezvousTimeoutError")
STEPS, GLOBAL_BATCH, SEQ = 3, 4, 16


def build():
    """The model both runs start from: a tiny Mamba, its last layer retrofitted with a live branch."""
    from helpers.models import build_tiny, randomize_resona
    from resona_adapt import ResonaConfig, retrofit

    model = retrofit(build_tiny("mamba", layers=2), layers=[-1],
                     config=ResonaConfig(chunk_size=4, top_k=2, num_heads=2, head_dim=8, search_dim=16))
    randomize_resona(model)
    return model.train()


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def train(model: torch.nn.Module, rank: int = 0, world: int = 1) -> list[float]:
    """AdamW on the trainable (Resona) parameters; each process takes its slice of every global batch.
    Returns the loss of each global batch (the mean over the processes)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    per = GLOBAL_BATCH // world
    for ids in batches():
        mine = ids[rank * per:(rank + 1) * per]
        loss = model(mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(loss)
        losses.append(loss.item() / world)
    return losses


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor whole (FSDP2 holds DTensor shards), keyed as the unsharded model keys them."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()}


def worker(out: Path) -> None:
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard

    from resona_adapt import CheckpointError

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = build()
    before = full_state(model)
    for block in model.backbone.layers:
        fully_shard(block)
    fully_shard(model)
    losses = train(model, rank, world)
    after = full_state(model)
    base_kept = all(torch.equal(after[k], before[k]) for k in before if ".resona." not in k)
    save_file({k: v.contiguous() for k, v in after.items() if ".resona." in k}, str(out / f"rank{rank}.safetensors"))
    try:  # saving the sharded model is refused (its tensors are shards), before anything is written
        model.save_pretrained(out / f"sharded{rank}")
        refused = ""
    except CheckpointError as exc:
        refused = str(exc) if not (out / f"sharded{rank}").exists() else ""
    if rank == 0:  # the README's recipe: the gathered state into an unsharded copy, saved by one process
        whole = build()
        whole.load_state_dict(after)
        whole.save_pretrained(out / "gathered")
    (out / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "base_kept": base_kept, "refused": refused,
                                                      "sharded": type(model).__name__}))
    torch.distributed.destroy_process_group()


def test_fsdp2_on_two_cpu_processes_equals_one_process(tmp_path):
    from safetensors.torch import load_file

    from resona_adapt import load_retrofitted

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tmp_path)]
    for _ in range(2):  # one retry when the launcher's rendezvous loses a port race with another job
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        if proc.returncode == 0 or not INFRA_ERROR.search(proc.stderr):
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    model = build()
    start = {k: v.detach().clone() for k, v in model.state_dict().items() if ".resona." in k}
    losses = train(model)
    one = {k: v.detach() for k, v in model.state_dict().items() if ".resona." in k}
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    shards = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert all(r["sharded"].startswith("FSDP") and r["base_kept"] for r in ranks)  # sharded, base frozen
    assert all("sharded by FSDP" in r["refused"] for r in ranks)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(losses), rtol=0, atol=1e-5)
    assert set(shards[0]) == set(shards[1]) == set(one) and one
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # training moved the branch
    for k in one:
        assert torch.equal(shards[0][k], shards[1][k]), k  # both processes hold the same Resona weights
        torch.testing.assert_close(shards[0][k], one[k], rtol=1e-4, atol=1e-5, msg=f"tensor {k} differs")
    gathered = load_retrofitted(tmp_path / "gathered").state_dict()
    assert all(torch.equal(gathered[k], shards[0][k]) for k in one)


if __name__ == "__main__":
    sys.path[:0] = [str(HERE)]
    worker(Path(sys.argv[1]))
