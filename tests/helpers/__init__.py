"""Test helpers (no tests here): tiny models and the shared checks the test files import.

- `models`: tiny random Mamba / Mamba2 / FalconMamba models (`build_tiny`), `VOCAB`, `randomize_resona`;
- `tiny_families`: a tiny model of every other supported transformers family (`build_family`);
- `matrix`: the family matrix's checks (`check_family`, `check_generate`, `logits`, `CFG`);
- `fla_support`: flash-linear-attention models on CPU (Triton interpreter);
- `hymba_support`: tiny Hymba models and official-layout checkpoints;
- `mamba_ssm_real`: mamba-ssm's own Python classes on CPU (its CUDA/Triton kernels routed to references);
- `kernel_cases`: inputs and a runner shared by the kernel tests.
"""
