"""A loss of the search's own: at every answer token, the chunk that holds the token to copy should
win the search (chunk-hit supervision).

The read loss trains the search only through the score it adds to the selected chunks' read
logits; a read that learns to tell needles apart by itself then leaves the search little gradient,
and the search's top-1 hit falls (docs/text-niah.md, "read_window"). This loss gives the search its
own target, found from the tokens alone, so it works for any copy-or-recall data:

- an answer run is a maximal stretch of labelled positions; for each of its tokens the *source* is the
  earlier position (before the run) whose surrounding tokens match the run best (the longest match
  backwards, also into the tokens before the run, plus forwards through the run; ties all count, up
  to `MAX_SOURCES`), so a needle's value is found whole, a distractor that shares a digit is not,
  and a one-token MQAR answer is found by its key;
- the query that predicts answer token ``p`` sits at ``p - 1``; it hits when it selects the chunk whose
  read holds the source ``j`` (chunk ``(j - read_shift) // U``) or, with
  ``neighbor_chunks``, a chunk that reads it as a neighbour;
- the loss is ``-log sum_{c in hits} softmax_c(SEARCH_LOSS_SCALE * cos(q_t, c))`` over the chunks
  the causal rule lets ``t`` select (``(c+1)*U + read_shift <= t``), averaged over the supervised queries.

    with SearchLoss(model) as search:          # hooks record each branch's inputs
        logits = model(input_ids=ids).logits
        loss = answer_loss + 0.5 * search(answers)   # answers: (B, T) labels, IGNORE elsewhere
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .data import IGNORE

SEARCH_LOSS_SCALE = 16.0
"""Cosine-to-logit scale of the search loss's softmax over chunks."""
MIN_MATCH = 2
"""A source must match at least this many tokens of the run (a lone common token says nothing)."""
LOOKBACK = 8
"""The match may also run this many tokens back before the answer (an MQAR key before its value)."""
MAX_SOURCES = 4
"""A token whose best match ties at more places than this (", " in a list) is not supervised."""


def answer_runs(labelled: Tensor) -> list[tuple[int, int]]:
    """labelled: (T,) bool -> the maximal runs ``[start, end)`` of True, in order."""
    pos = labelled.nonzero().flatten().tolist()
    runs: list[tuple[int, int]] = []
    for p in pos:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def copy_sources(ids: Tensor, start: int, end: int, run: Tensor | None = None, min_match: int = MIN_MATCH,
                 max_sources: int = MAX_SOURCES) -> list[list[int]]:
    """ids: (T,) input tokens; the answer run ``[start, end)`` with its tokens ``run`` (L,) (default
    ``ids[start:end]``; MQAR's inputs there are not the answers) -> for each run position, the positions
    ``j < start`` whose match with the run around it (backwards, up to `LOOKBACK` input tokens past the
    run's start, then forwards within the run) is longest and at least ``min_match`` tokens; empty when
    none is, or when more than ``max_sources`` tie."""
    ctx = ids[:start]  # (S,)
    run = ids[start:end] if run is None else run  # (L,)
    S, L = ctx.numel(), run.numel()
    if S == 0:
        return [[] for _ in range(L)]
    same = (ctx.unsqueeze(1) == run.unsqueeze(0)).long()  # (S, L)
    before = torch.zeros(S, dtype=torch.long)  # before[j]: tokens before j that match those before the run
    alive = torch.ones(S, dtype=torch.bool)
    for i in range(1, min(LOOKBACK, start) + 1):
        j = torch.arange(S) - i  # (S,)
        alive &= (j >= 0) & (ctx[j.clamp(min=0)] == ids[start - i])
        before += alive.long()
    back = same.clone()  # back[j, k]: matching tokens ending at (j, k), going back along the diagonal
    back[:, 0] = same[:, 0] * (1 + before)
    for k in range(1, L):
        back[1:, k] = same[1:, k] * (back[:-1, k - 1] + 1)
    fwd = same.clone()  # fwd[j, k]: matching tokens starting at (j, k), going forward
    for k in range(L - 2, -1, -1):
        fwd[:-1, k] = same[:-1, k] * (fwd[1:, k + 1] + 1)
    total = (back + fwd - 1).clamp(min=0)  # (S, L) length of the whole matching stretch through (j, k)
    best = total.max(dim=0).values  # (L,)
    out = []
    for k in range(L):
        b = int(best[k])
        found = (total[:, k] == b).nonzero().flatten().tolist() if b >= min_match else []
        out.append(found if len(found) <= max_sources else [])
    return out


def search_targets(ids: Tensor, answers: Tensor, chunk_size: int, neighbors: int = 0,
                   read_shift: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """ids, answers: (B, T) input tokens and answer labels at the input positions (causal-LM labels:
    ``answers[p]`` is predicted at ``p - 1``; `IGNORE` elsewhere) -> ``(rows, queries, hits)``:
    (Q,) row and (Q,) position of every supervised search query, and (Q, N) bool, the chunks whose
    selection reads the token that query must copy (N = T // chunk_size). Queries whose source is
    not in a complete chunk they may see, or that have no source, are left out."""
    B, T = ids.shape
    N = T // chunk_size
    rows, queries, hits = [], [], []
    for b in range(B):
        for start, end in answer_runs(answers[b] != IGNORE):
            for k, sources in enumerate(copy_sources(ids[b], start, end, answers[b, start:end])):
                t = start + k - 1  # the query that predicts the token at start + k
                visible = (t - read_shift) // chunk_size  # chunks 0 .. visible-1 the query may select
                row = torch.zeros(N, dtype=torch.bool)
                for j in sources:
                    c = (j - read_shift) // chunk_size  # the chunk whose read holds position j
                    if 0 <= c < visible:
                        row[max(0, c - neighbors):c + 1] = True
                if t >= 0 and bool(row.any()):
                    rows.append(b)
                    queries.append(t)
                    hits.append(row)
    if not hits:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, N, dtype=torch.bool)
    return torch.tensor(rows), torch.tensor(queries), torch.stack(hits)


def branch_search_loss(branch: nn.Module, h: Tensor, x: Tensor, rows: Tensor, queries: Tensor, hits: Tensor) -> Tensor:
    """The search loss of one `ResonaBranch` given its inputs h, x: (B, T, D) and `search_targets`."""
    cfg = branch.config
    h_hat, x_hat = branch.norm_h(h), branch.norm_x(x)  # (B, T, D) x2
    recent = branch.recent_context(x_hat) if branch.window_encoder is not None else None  # (B, T, D)
    qs = branch.search_queries(h_hat, recent)  # (B, T, E)
    cs = branch.chunk_embeddings(x_hat)  # (B, N, E)
    q = qs[rows.to(qs.device), queries.to(qs.device)]  # (Q, E)
    s = torch.einsum("qe,qne->qn", q, cs[rows.to(cs.device)]) * SEARCH_LOSS_SCALE  # (Q, N)
    may_select = (queries.to(s.device) - cfg.read_shift) // cfg.chunk_size  # (Q,) the causal rule of `ops.select_tiled`
    visible = torch.arange(s.shape[1], device=s.device) < may_select.unsqueeze(1)  # (Q, N)
    s = s.masked_fill(~visible, float("-inf"))
    hit = s.masked_fill(~hits.to(s.device), float("-inf"))
    return (torch.logsumexp(s, dim=1) - torch.logsumexp(hit, dim=1)).mean()


class SearchLoss:
    """Records, while active, each Resona branch's inputs and the model's ``input_ids``; calling it
    with the answer labels (B, T) gives the mean `branch_search_loss` over the branches (0 when the
    batch has no supervised query). Use as a context manager; the hooks are removed on exit."""

    def __init__(self, model: nn.Module) -> None:
        from ..retrofit import resona_layers

        self.model = model
        self.branches = [layer.resona for layer in resona_layers(model).values()]
        self.inputs: dict[int, tuple[Tensor, Tensor]] = {}
        self.ids: Tensor | None = None
        self._hooks: list[Any] = []

    def __enter__(self) -> "SearchLoss":
        def record_ids(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.ids = ids if isinstance(ids, Tensor) else None

        def record(i: int) -> Any:
            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                pad = kwargs.get("pad")
                if pad is not None and bool(pad.any()):
                    raise ValueError("the search loss does not support left-padded batches")
                self.inputs[i] = (args[0], args[1])  # h, x: (B, T, D) each
            return hook

        self._hooks.append(self.model.register_forward_pre_hook(record_ids, with_kwargs=True))
        for i, branch in enumerate(self.branches):
            self._hooks.append(branch.register_forward_pre_hook(record(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.inputs.clear()

    def __call__(self, answers: Tensor) -> Tensor:
        if self.ids is None or len(self.inputs) != len(self.branches):
            raise RuntimeError("SearchLoss: no forward recorded; call the model inside the `with` block first")
        losses = []
        targets: dict[tuple[int, int, int], tuple[Tensor, Tensor, Tensor]] = {}  # branches alike share them
        for i, branch in enumerate(self.branches):
            h, x = self.inputs[i]
            cfg = branch.config
            key = (cfg.chunk_size, cfg.neighbor_chunks, cfg.read_shift)
            if key not in targets:
                targets[key] = search_targets(self.ids.cpu(), answers.cpu(), *key)
            rows, queries, hits = targets[key]
            if rows.numel():
                losses.append(branch_search_loss(branch, h, x, rows, queries, hits))
        if not losses:
            return next(iter(self.inputs.values()))[0].new_zeros(()).float()
        return torch.stack(losses).mean()


def check_supervised(model: nn.Module, dataset: Any, probe: int = 16) -> None:
    """Refuse (`ResonaConfigError`) a search loss that would have nothing to supervise: none of the first
    ``probe`` examples of ``dataset`` (dicts of ``input_ids`` and causal-LM ``labels``) has an answer
    token whose source occurs earlier in it, as with plain-text rows (every token labelled)."""
    from ..errors import ResonaConfigError
    from ..retrofit import resona_layers

    configs = [layer.resona.config for layer in resona_layers(model).values()]
    n = min(probe, len(dataset)) if hasattr(dataset, "__len__") else probe
    for i in range(n):
        example = dataset[i]
        ids, labels = example["input_ids"].view(1, -1), example["labels"].view(1, -1)  # (1, T) each
        if any(search_targets(ids, labels, c.chunk_size, c.neighbor_chunks, c.read_shift)[0].numel() for c in configs):
            return
    raise ResonaConfigError(
        f"the search loss has nothing to supervise: in the first {n} training examples no answer token occurs "
        "earlier in its example (plain-text rows label every token, so they have no answers); train on "
        "prompt/completion rows or --task mqar/niah, or set the search loss weight to 0")
