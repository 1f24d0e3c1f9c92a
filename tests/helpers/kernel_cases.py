"""Inputs and a runner shared by the kernel tests (a helper module, not a test file)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resona_adapt.kernels.reference import add_neighbors, select_chunks_ref


def make_inputs(B, T, H, d, U, K, sink, pos, dtype, seed=0, device=None, neighbors=0, token_bias=False):
    """Leaves (q, k, v, bias, sink_logit, pos_bias; requires_grad), chunk indices from a real causal
    search (with ``neighbors``: and their neighbour slots, empty slots between full ones), and an
    upstream gradient. q, k, v in ``dtype``; bias, sink and pos_bias in float32. ``token_bias``: the
    bias is (B, T, K', U), one logit per slot token (the score plus a random term per token)."""
    g = torch.Generator().manual_seed(seed)
    N = T // U
    qs = F.normalize(torch.randn(B, T, 8, generator=g), dim=-1)
    cs = F.normalize(torch.randn(B, N, 8, generator=g), dim=-1)
    idx, score = select_chunks_ref(qs, cs, K, U, torch.arange(T))
    idx, score = add_neighbors(idx, score, torch.arange(T), U, neighbors)
    leaves = {
        "q": torch.randn(B, T, H, d, generator=g).to(dtype),
        "k": torch.randn(B, T, H, d, generator=g).to(dtype),
        "v": torch.randn(B, T, H, d, generator=g).to(dtype),
        "bias": ((score * 4).unsqueeze(-1) + torch.randn(*score.shape, U, generator=g) * 2).detach()
        if token_bias else (score * 4).detach(),
        "sink_logit": torch.randn(H, generator=g) if sink else None,
        "pos_bias": torch.randn(H, U, generator=g) if pos else None,
    }
    leaves = {n: (t.to(device).requires_grad_() if t is not None else None) for n, t in leaves.items()}
    d_out = torch.randn(B, T, H, d, generator=g).to(dtype).to(device)
    return leaves, idx.to(device), d_out


def run(fn, leaves, idx, d_out, U, **kw):
    """Output of ``fn`` and the gradients of every given leaf under the same upstream gradient."""
    out = fn(leaves["q"], leaves["k"], leaves["v"], idx, leaves["bias"], U,
             sink_logit=leaves["sink_logit"], pos_bias=leaves["pos_bias"], **kw)
    names = [n for n, t in leaves.items() if t is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], d_out)
    return out, dict(zip(names, grads))


def compile_for_sm80() -> int:
    """Compile every Triton kernel of `triton_attention` for an sm_80 target (nothing runs); returns
    how many compiled. Needs a process where ``TRITON_INTERPRET`` is off."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from resona_adapt.kernels import triton_attention as ta

    assert not triton.knobs.runtime.interpret, "compile_for_sm80 needs TRITON_INTERPRET off"
    count = 0
    for x, D, U, flags in (("*fp16", 64, 64, True), ("*fp32", 6, 3, False)):
        f, i = "*fp32", "*i64"
        meta = dict(H=3, D=D, U=U, KS=2, BD=triton.next_power_of_2(D), BU=triton.next_power_of_2(U))
        kernels = {
            ta._fwd: ({"Q": x, "K": x, "V": x, "IDX": i, "BIAS": f, "POS": f, "SINK": f, "O": x, "LSE": f,
                       "TQ": "i32", "TK": "i32", "scale": "fp32"},
                     dict(HAS_SINK=flags, HAS_POS=flags, PER_TOKEN=flags)),
            ta._bwd_dq: ({"Q": x, "K": x, "V": x, "IDX": i, "BIAS": f, "POS": f, "DO": x, "LSE": f, "DELTA": f,
                          "DQ": x, "DSLOT": f, "TQ": "i32", "TK": "i32", "scale": "fp32"},
                         dict(HAS_POS=flags, PER_TOKEN=flags)),
            ta._bwd_dkv: ({"Q": x, "K": x, "V": x, "BIAS": f, "POS": f, "DO": x, "LSE": f, "DELTA": f, "DK": x,
                           "DV": x, "DPOS": f, "CSR_PAIR": i, "CSR_OFF": i, "TQ": "i32", "TK": "i32", "NC": "i32",
                           "scale": "fp32"}, dict(HAS_POS=flags, PER_TOKEN=flags)),
        }
        for fn, (signature, extra) in kernels.items():
            jitted = triton.jit(fn)
            consts = {**meta, **extra}
            src = ASTSource(
                fn=jitted, signature={**signature, **{k: "constexpr" for k in consts}},
                constexprs={(jitted.arg_names.index(k),): v for k, v in consts.items()},
            )
            compiled = triton.compile(src, target=GPUTarget("cuda", 80, 32))
            assert "ptx" in compiled.asm, fn.__name__
            count += 1
    return count
