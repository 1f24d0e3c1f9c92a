"""Study: can flash-linear-attention's NSA selection op serve as the chunk attention? (no GPU here)

``fla.ops.nsa.parallel.ParallelNSAFunction(q, k, v, block_indices, block_counts, block_size,
scale, cu_seqlens)`` attends each query to the tokens of its selected blocks (per query and kv
head, -1 = empty), forward and backward, in Triton. This script runs it under Triton's interpreter
on CPU against resona-adapt's reference and prints what matches and what is missing:

1. the shared core (no score bias, no sink, no pos_bias) for queries with at least one block;
2. queries with no block (the first chunk);
3. the parts of Resona's read attention the op has no input for.

Timing in the interpreter means nothing, so none is printed. Needs fla and triton installed.

    python benchmarks/study_fla_nsa.py
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: triton.language jits its helpers at import
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def pin_autotune(module) -> None:
    """The interpreter cannot benchmark autotune configs (no driver): keep the first config."""
    for name in dir(module):
        obj = getattr(module, name)
        while hasattr(obj, "fn"):
            if hasattr(obj, "configs"):
                obj.configs = obj.configs[:1]
            obj = obj.fn


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import fla.ops.attn.parallel as attn_parallel
    import fla.ops.nsa.parallel as nsa

    from resona_adapt.kernels.reference import chunk_attention_ref, select_chunks_ref

    pin_autotune(nsa)
    pin_autotune(attn_parallel)
    B, T, H, d, U, K = 1, 40, 2, 16, 8, 2
    g = torch.Generator().manual_seed(0)
    qs = F.normalize(torch.randn(B, T, 8, generator=g), dim=-1)
    cs = F.normalize(torch.randn(B, T // U, 8, generator=g), dim=-1)
    idx, _ = select_chunks_ref(qs, cs, K, U, torch.arange(T))  # (B, T, K), -1 = empty
    q, k, v = (torch.randn(B, T, H, d, generator=g, requires_grad=True) for _ in range(3))
    zero_bias = torch.zeros(B, T, K)

    ref = chunk_attention_ref(q, k, v, idx, zero_bias, U)  # no bias, no sink, no pos_bias
    block_indices = idx.to(torch.int32).unsqueeze(2).expand(B, T, H, K).contiguous()  # per kv head
    out = nsa.ParallelNSAFunction.apply(q, k, v, block_indices, K, U, d**-0.5, None)
    has_block = (idx >= 0).any(-1)[0]  # (T,)
    do = torch.randn(B, T, H, d, generator=g)
    mask = has_block.view(1, T, 1, 1).float()
    g_ref = torch.autograd.grad(ref, (q, k, v), do * mask)
    g_nsa = torch.autograd.grad(torch.nan_to_num(out) * mask, (q, k, v), do * mask)
    print(f"shapes: B={B} T={T} H={H} (one query head per kv head, G=1) d={d} U={U} K={K}")
    print(f"1. queries with >= 1 block: max |out - ref| = {(out - ref)[:, has_block].abs().max():.2e}; "
          + ", ".join(f"max |d{n} - ref| = {(a - b).abs().max():.2e}" for n, a, b in zip("qkv", g_nsa, g_ref)))
    empty = out[:, ~has_block]
    print(f"2. queries with no block ({int((~has_block).sum())}): NaN in {int(empty.isnan().any(-1).any(-1).sum())}"
          " of them (the reference returns zeros)")
    print("3. no input for: the per-slot score bias (the gradient that trains the search), the sink logit, "
          "pos_bias; no log-sum-exp output to differentiate if they were added outside")


if __name__ == "__main__":
    main()
