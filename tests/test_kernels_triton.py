"""The Triton chunk attention against the reference: forward and every gradient.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, which checks their arithmetic
and indexing (not their speed), and are compiled for an sm_80 target (not run) so that the real
compiler has accepted them too. With a GPU the same cases run compiled, on CUDA.

Triton reads ``TRITON_INTERPRET`` when it is first imported (``triton.language`` jits its own
helpers then), so one process either interprets or compiles. tests/conftest.py turns the
interpreter on for the whole session on machines without a GPU (fla's tests need it too), so the
cases run here directly and the compile check runs in a child process started without it. If the
session was started without the interpreter and without a GPU, it is the other way round: the
cases run in a child started with ``TRITON_INTERPRET=1``, and the tests marked skipped here name
the test that ran them. Everything is skipped, with the reason, only when triton is not importable.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resona_adapt import ResonaConfig
from resona_adapt.adapters import ResonaBranch
from resona_adapt.kernels.dispatch import get_backend, triton_importable, triton_interpreting
from resona_adapt.kernels.reference import chunk_attention_ref

from helpers.kernel_cases import make_inputs, run

ON_GPU = torch.cuda.is_available()
INTERPRETING = triton_interpreting()  # conftest sets it before anything imports triton
RUN_HERE = ON_GPU or INTERPRETING
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(
    not triton_importable(), reason="triton is not importable (install the extra: pip install -e '.[fla]')"
)
kernel_cases = pytest.mark.skipif(
    not RUN_HERE,
    reason="no GPU and no interpreter in this process: run by test_interpreted_cases_in_a_fresh_process",
)

# (B, T, H, d, U, K, sink, pos_bias): T not a multiple of U, K above the number of eligible chunks,
# the first chunk (nothing eligible), several heads, batch > 1, sizes that are not powers of two
CASES = [
    (2, 11, 2, 8, 4, 3, True, True),
    (1, 10, 3, 4, 3, 8, False, True),
    (2, 9, 1, 6, 2, 2, True, False),
]
TOL = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=4e-3)}
N_KERNEL_CASES = 2 * 2 * 2 * len(CASES) + 1  # the parametrised grid plus the branch test


@pytest.mark.skipif(RUN_HERE, reason="the cases run directly in this process")
def test_interpreted_cases_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-o", "addopts=", "-q", "-p", "no:cacheprovider",
         "-k", "not fresh_process and not compile"],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) == N_KERNEL_CASES and "skipped" not in proc.stdout, tail


def triton_attention(*args, **kwargs):
    from resona_adapt.kernels.triton_attention import chunk_attention_triton

    return chunk_attention_triton(*args, **kwargs)


@kernel_cases
@pytest.mark.parametrize("token_bias", [False, True])
@pytest.mark.parametrize("neighbors", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference_forward_and_every_gradient(case, dtype, neighbors, token_bias):
    B, T, H, d, U, K, sink, pos = case
    leaves, idx, d_out = make_inputs(B, T, H, d, U, K, sink, pos, dtype, device=DEVICE, neighbors=neighbors,
                                     token_bias=token_bias)
    assert (idx[:, :U] == -1).all()  # the first chunk retrieves nothing
    ref_out, ref_grads = run(chunk_attention_ref, leaves, idx, d_out, U)
    out, grads = run(triton_attention, leaves, idx, d_out, U)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    assert set(grads) == set(ref_grads) and {"q", "k", "v", "bias"} <= set(grads)
    for name, grad in grads.items():
        assert grad.dtype == leaves[name].dtype, name
        torch.testing.assert_close(grad, ref_grads[name], **TOL[dtype], msg=lambda m: f"d{name}: {m}")
    if not sink:
        assert (out[:, :U] == 0).all()


@kernel_cases
def test_branch_through_the_dispatch_point_with_triton(monkeypatch):
    """RESONA_KERNEL=triton end to end: same output, and the search encoders still get gradient."""
    torch.manual_seed(0)
    branch = ResonaBranch(16, ResonaConfig(chunk_size=3, top_k=2, num_heads=2, head_dim=4, search_dim=8))
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    branch.to(DEVICE)
    h, x = torch.randn(1, 10, 16, device=DEVICE), torch.randn(1, 10, 16, device=DEVICE)
    grads = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("RESONA_KERNEL", name)
        assert get_backend(DEVICE).name == name
        branch.zero_grad()
        y = branch(h, x, torch.zeros_like(h))
        y.square().sum().backward()
        grads[name] = (y.detach(), {n: p.grad.clone() for n, p in branch.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], atol=2e-6, rtol=1e-5)
    assert grads["triton"][1].keys() == grads["torch"][1].keys()
    for n, g in grads["triton"][1].items():
        # float32 sums in another order: compare relative to the largest entry (the search encoders' gradient
        # sums the slot-bias gradient over every token of a chunk: ~1e-5 relative with shifted keys and reads)
        ref = grads["torch"][1][n]
        assert (g - ref).abs().max() <= 5e-5 * ref.abs().max(), (n, (g - ref).abs().max(), ref.abs().max())
    assert grads["triton"][1]["query_encoder.weight"].abs().sum() > 0


def test_kernels_compile_for_a_gpu_target():
    """The interpreter accepts code the compiler rejects: compile every kernel for sm_80 (not run),
    in a child process without the interpreter when this one interprets."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="this triton build has no CUDA backend")
    if not INTERPRETING:
        from helpers.kernel_cases import compile_for_sm80

        assert compile_for_sm80() == 6
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", "from helpers.kernel_cases import compile_for_sm80; print(compile_for_sm80())"],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("6"), proc.stdout[-3000:] + proc.stderr[-5000:]
