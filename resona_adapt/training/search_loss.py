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


def row_sources(ids: Tensor, answers: Tensor, min_match: int = MIN_MATCH,
                max_sources: int = MAX_SOURCES) -> tuple[Tensor, Tensor]:
    """ids, answers: (T,) one row's input tokens and answer tokens (`IGNORE` where unlabelled) ->
    ``(positions, sources)``: (P,) the labelled positions and (P, max_sources) their sources, -1 padded.

    The sources of the answer token at ``p``, in the run ``[s, e)`` of labelled positions, are the
    positions ``j < s`` whose match with the run around ``p`` (backwards through the run and up to
    `LOOKBACK` input tokens before ``s``, then forwards through the run) is longest and at least
    ``min_match`` tokens; none when no match is that long or more than ``max_sources`` tie. All runs
    at once: the loops go over `LOOKBACK` and the longest run, not over the runs."""
    T = ids.numel()
    pos = (answers != IGNORE).nonzero().flatten()  # (P,)
    P = pos.numel()
    sources = torch.full((P, max_sources), -1, dtype=torch.long)  # (P, M)
    if P == 0:
        return pos, sources
    first = torch.ones(P, dtype=torch.bool)  # the first position of its run
    first[1:] = pos[1:] != pos[:-1] + 1
    last = torch.ones(P, dtype=torch.bool)  # the last position of its run
    last[:-1] = first[1:]
    run = first.long().cumsum(0) - 1  # (P,) run index
    starts = pos[first]  # (R,)
    ends = pos[last]  # (R,) last positions
    s = starts[run]  # (P,)
    j = torch.arange(T).unsqueeze(1)  # (T, 1) candidate sources
    may = j < s.unsqueeze(0)  # (T, P) a source lies before its run
    if not bool(may.any()):
        return pos, sources
    same = ((ids.unsqueeze(1) == answers[pos].unsqueeze(0)) & may).long()  # (T, P)
    before = torch.zeros(T, starts.numel(), dtype=torch.long)  # (T, R) tokens before j matching those before a run
    alive = torch.ones(T, starts.numel(), dtype=torch.bool)
    for i in range(1, LOOKBACK + 1):
        alive &= (j >= i) & (starts >= i).unsqueeze(0) & (ids[(j - i).clamp(min=0)] == ids[(starts - i).clamp(min=0)])
        before += alive.long()
    back = same * (1 + before[:, run])  # (T, P) matching tokens ending at (j, p), going back; right at run starts
    offset = pos - s  # (P,)
    for k in range(1, int(offset.max()) + 1):  # within a run: back[j, p] = same[j, p] * (back[j-1, p-1] + 1)
        cols = (offset == k).nonzero().flatten()  # (n,)
        back[1:, cols] = same[1:, cols] * (back[:-1, cols - 1] + 1)
    fwd = same.clone()  # (T, P) matching tokens starting at (j, p), going forward
    to_end = ends[run] - pos  # (P,)
    for k in range(1, int(to_end.max()) + 1):  # within a run: fwd[j, p] = same[j, p] * (fwd[j+1, p+1] + 1)
        cols = (to_end == k).nonzero().flatten()  # (n,)
        fwd[:-1, cols] = same[:-1, cols] * (fwd[1:, cols + 1] + 1)
    total = (back + fwd - 1).clamp(min=0)  # (T, P) length of the whole matching stretch through (j, p)
    best = total.max(dim=0).values  # (P,)
    found = (total == best) & (best >= min_match) & may  # (T, P)
    count = found.sum(0)  # (P,)
    jj, pp = found.T.nonzero(as_tuple=True)[::-1]  # found pairs, by column then j
    rank = found.long().cumsum(0)[jj, pp] - 1  # place of each among its column's sources
    ok = count[pp] <= max_sources
    sources[pp[ok], rank[ok]] = jj[ok]
    return pos, sources


def copy_sources(ids: Tensor, start: int, end: int, run: Tensor | None = None, min_match: int = MIN_MATCH,
                 max_sources: int = MAX_SOURCES) -> list[list[int]]:
    """The `row_sources` of one answer run ``[start, end)`` of ``ids`` (T,), with its tokens ``run`` (L,)
    (default ``ids[start:end]``; MQAR's inputs there are not the answers) -> a list of sources per run
    position (empty when it has none)."""
    answers = torch.full((end,), IGNORE, dtype=torch.long)
    answers[start:end] = ids[start:end] if run is None else run
    _, found = row_sources(ids[:end], answers, min_match, max_sources)
    return [[j for j in row if j >= 0] for row in found.tolist()]


def search_targets(ids: Tensor, answers: Tensor, chunk_size: int, neighbors: int = 0,
                   read_shift: int = 1, starts: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """ids, answers: (B, T) input tokens and answer labels at the input positions (causal-LM labels:
    ``answers[p]`` is predicted at ``p - 1``; `IGNORE` elsewhere) -> ``(rows, queries, hits)``:
    (Q,) row and (Q,) position of every supervised search query, and (Q, N) bool, the chunks whose
    selection reads the token that query must copy (N = T // chunk_size). Queries whose source is
    not in a complete chunk they may see, or that have no source, are left out.

    ``starts``: (B, T) bool, the line starts of a list answer (`list_loss.flagged` of the labels; one
    list per row at most). The query before a line start then hits the chunks of every value still
    to give (its own line start's and the later ones'), not only the next in document order: the
    search's side of `list_loss.list_row_mean_loss`."""
    B, T = ids.shape
    N = T // chunk_size
    chunk = torch.arange(N)  # (N,)
    empty = torch.zeros(0, dtype=torch.long)
    rows, queries, hits = [empty], [empty], [torch.zeros(0, N, dtype=torch.bool)]
    for b in range(B):
        pos, src = row_sources(ids[b], answers[b])  # (P,), (P, M)
        t = pos - 1  # the query that predicts the token at pos
        visible = torch.div(t - read_shift, chunk_size, rounding_mode="floor")  # (P,) it may select chunks < visible
        c = torch.div(src - read_shift, chunk_size, rounding_mode="floor")  # (P, M) the chunk whose read holds a source
        real = (src >= 0) & (c >= 0) & (c < visible.unsqueeze(1))  # (P, M)
        within = (chunk >= (c - neighbors).unsqueeze(-1)) & (chunk <= c.unsqueeze(-1))  # (P, M, N)
        row = (within & real.unsqueeze(-1)).any(1)  # (P, N)
        if starts is not None:
            at = starts[b, pos]  # (P,) the list's line starts
            row[at] = row[at].flip(0).cumsum(0).flip(0) > 0  # (S, N) this value or any later one
        keep = (t >= 0) & row.any(1)  # (P,)
        rows.append(torch.full((int(keep.sum()),), b, dtype=torch.long))
        queries.append(t[keep])
        hits.append(row[keep])
    return torch.cat(rows), torch.cat(queries), torch.cat(hits)


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

    def __call__(self, answers: Tensor, starts: Tensor | None = None) -> Tensor:
        """answers: (B, T) answer labels (`IGNORE` elsewhere); ``starts``: (B, T) bool list line starts
        whose queries may hit any value still to give (`search_targets`), or None."""
        if self.ids is None or len(self.inputs) != len(self.branches):
            raise RuntimeError("SearchLoss: no forward recorded; call the model inside the `with` block first")
        losses = []
        targets: dict[tuple[int, int, int], tuple[Tensor, Tensor, Tensor]] = {}  # branches alike share them
        for i, branch in enumerate(self.branches):
            h, x = self.inputs[i]
            cfg = branch.config
            key = (cfg.chunk_size, cfg.neighbor_chunks, cfg.read_shift)
            if key not in targets:
                targets[key] = search_targets(self.ids.cpu(), answers.cpu(), *key,
                                              starts=None if starts is None else starts.cpu())
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
