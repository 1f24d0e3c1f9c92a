"""`ResonaConfig`: every knob of a Resona branch, validated, and round-tripped through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ResonaConfigError

MIX_MODES = ("residual", "gated", "paper", "paper-dynamic")
"""How the retrieval output `Yr` is combined with the mixer output `Ym`.

- ``residual`` (default): ``Y = Ym + W_out(attn)``, ``W_out`` zero-initialised. Function-preserving.
- ``gated``: ``Y = Ym + tanh(g(H)) * W_out(attn)``, an input-dependent per-channel gate whose
  projection is zero-initialised. Function-preserving.
- ``paper``: the paper's ``Y = a * Ym + (1 - a) * Yr`` with a fixed ``alpha``. Not function-preserving.
- ``paper-dynamic``: the paper's mix with an input-dependent ``a = sigmoid(w . X + b)``, ``b`` set
  so that ``a`` starts at ``alpha``. Not function-preserving.
"""

FUNCTION_PRESERVING_MIXES = ("residual", "gated")
LEGACY_DEFAULTS = {"neighbor_chunks": 0, "read_shift": 0, "key_shift": False, "coverage_by_position": False}
"""Values of fields added after 0.1.0 for a saved configuration that lacks them (it was trained without)."""
CHUNK_POOLS = ("mean", "weighted", "attention")
FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    "score_scale": (0.0, 1e3, False),  # added to attention logits: larger overflows half precision
    "alpha": (0.0, 1.0, False),  # a weight of Ym; strictly inside (0, 1) for the paper mixes
    "lr_multiplier": (0.0, 1e6, True),
    "norm_eps": (0.0, 1.0, True),  # an epsilon: as large as the mean square, it switches the branch off
}
"""(low, high, low_open) of every float field of `ResonaConfig`; every float field must also be finite."""


@dataclass
class ResonaConfig:
    """Configuration of the Resona branches inserted by `retrofit`.

    One configuration applies to every Resona layer of a model. All fields have defaults; the
    constructor normalises and validates them and raises `ResonaConfigError` naming the field.
    """

    chunk_size: int = field(default=64, metadata={"help": "Tokens per context chunk (U)."})
    top_k: int = field(default=2, metadata={"help": "Chunks retrieved per query at inference (k)."})
    train_top_k: int | None = field(
        default=None,
        metadata={"help": "Chunks retrieved per query in training mode; None = top_k. A larger k in "
                  "training shows the read path more candidates while the search is still poor."},
    )
    num_heads: int | None = field(
        default=None,
        metadata={"help": "Heads of the knowledge-integration attention; None = max(1, width // 256)."},
    )
    head_dim: int | None = field(default=None, metadata={"help": "Dimension of each head; None = 64."})
    search_dim: int | None = field(
        default=None, metadata={"help": "Dimension E of query and chunk embeddings; None = min(64, width)."}
    )
    score_scale: float = field(
        default=8.0,
        metadata={"help": "Multiplier of the search score (cosine) added to the read logits of the "
                  "selected chunk's tokens; this is the path that trains the search encoders."},
    )
    sink: bool = field(
        default=True,
        metadata={"help": "Add a learnable attention-sink logit (value 0) per head, so absolute logits "
                  "matter and top_k=1 still passes gradient to the search."},
    )
    chunk_pool: str = field(
        default="mean",
        metadata={"help": "How a chunk's embeddings are pooled into its search summary: 'mean'; 'weighted' "
                  "(softmax of a learned logit per position within the chunk); or 'attention' (softmax over the "
                  "chunk of a learned score of each token's embedding, whatever its position). Both start as the mean."},
    )
    neighbor_chunks: int = field(
        default=0,
        metadata={"help": "Each selected chunk is read together with the next `neighbor_chunks` chunks that are "
                  "complete before the query, so a fact that straddles a chunk boundary (a key at the end of "
                  "one chunk, its value at the start of the next) is read whole. 0 = the selected chunks only."},
    )
    read_shift: int = field(
        default=1,
        metadata={"help": "1: a selected chunk is read as the tokens that follow its tokens (positions shifted by "
                  "one), so the search finds where the current context occurred and the read returns what came "
                  "next; 0: the chunk's own tokens."},
    )
    key_shift: bool = field(
        default=True,
        metadata={"help": "Read keys also see the previous token (k_j = W_k x_j + W_p x_(j-1)), so the read can "
                  "find 'the token after the one I hold' wherever it sits in a chunk (copying, recall)."},
    )
    key_context: int = field(
        default=1,
        metadata={"help": "With key_shift: how many previous tokens each read key sees (k_j = W_k x_j + sum_o W_o "
                  "x_(j-o), o = 1..key_context). 2 lets the read copy a sequence whose tokens repeat (a number "
                  "like 8653855: 'the token after 8' is ambiguous, 'after 6 8' is not)."},
    )
    query_window: int = field(
        default=0,
        metadata={"help": "Search queries also see the token embeddings of the last `query_window` positions (the "
                  "query's own included), pooled by a learned token score plus a per-offset bias and projected by "
                  "a zero-initialised encoder, so a query can look for where its recent context occurred (a key "
                  "a few tokens back in a question). 0 = the layer input alone, as in the paper."},
    )
    read_window: bool = field(
        default=False,
        metadata={"help": "With query_window and key_shift: the read also sees the pooled window. Each read key "
                  "adds the pooled embeddings of the query_window tokens before it, and the read query its own "
                  "pooled window (zero-initialised), so the read can prefer the value whose needle names the asked "
                  "key when several look alike (RULER's multikey)."},
    )
    read_coverage: int = field(
        default=0,
        metadata={"help": "Read coverage window W (0 = off): each read slot's logits get -g(h) x the number of the "
                  "last W positions whose 3 tokens ending there also end at a position of that slot (what the "
                  "recent output already copied from it), with g a zero-initialised projection of the layer "
                  "input, so a list answer can move on to a value it has not given (RULER's multivalue)."},
    )
    coverage_by_position: bool = field(
        default=False,
        metadata={"help": "With read_coverage: also count the copies per read position. Beside the chunk's count, "
                  "each position's logit gets -p(h) x the number of the last W positions whose 3 tokens also "
                  "end there (p a second zero-initialised gate), so a copy that reaches a token sequence seen "
                  "twice in one chunk moves on to the occurrence it has not copied yet (a uuid with a repeated "
                  "pair)."},
    )
    read_order: bool = field(
        default=False,
        metadata={"help": "Each read slot's logits get -o(h) x the slot's rank by position among the chunks read "
                  "(0 for the earliest), with o a zero-initialised projection of the layer input, so a read that "
                  "finds several look-alike matches can pick one (the earliest, or with o < 0 the latest) instead "
                  "of blending them: a list answer's line start (with read_coverage, which moves it on from a "
                  "value it has copied), or a key that recurs after its pair. Train and read with the same "
                  "number of chunks (train_top_k = top_k): the rank's range grows with it."},
    )
    mix: str = field(default="residual", metadata={"help": f"Mixing mode, one of {MIX_MODES}."})
    alpha: float = field(default=0.5, metadata={"help": "Weight a of Ym in the paper mixes (0 < a < 1)."})
    lr_multiplier: float = field(
        default=20.0, metadata={"help": "Resona learning rate = base learning rate x this factor."}
    )
    norm_eps: float = field(default=1e-5, metadata={"help": "Epsilon of the branch's RMS norms."})
    replace_attention: bool = field(
        default=False,
        metadata={"help": "Hybrid-head families (Hymba): replace the attention heads of the chosen layers "
                  "with the Resona branch (not function-preserving) instead of adding Resona as a third "
                  "branch beside the attention and SSM heads."},
    )
    query_tile: int | None = field(
        default=None,
        metadata={"help": "Queries per tile of the CPU attention's by-query path (chunks under 16 "
                  "tokens); None = sized so that one tile's gathered keys stay within a few MiB. "
                  "Larger chunks go chunk by chunk and the Triton kernel does not tile."},
    )

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ResonaConfigError(f"ResonaConfig.{name} must be a positive integer, got {value!r}")

        positive_int("chunk_size")
        positive_int("top_k")
        n = self.neighbor_chunks
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 4:
            raise ResonaConfigError(f"ResonaConfig.neighbor_chunks must be an integer from 0 to 4, got {n!r}")
        n = self.key_context
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4:
            raise ResonaConfigError(f"ResonaConfig.key_context must be an integer from 1 to 4, got {n!r}")
        w = self.query_window
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 256:
            raise ResonaConfigError(f"ResonaConfig.query_window must be an integer from 0 to 256, got {w!r}")
        if not isinstance(self.read_window, bool):
            raise ResonaConfigError(f"ResonaConfig.read_window must be true or false, got {self.read_window!r}")
        if self.read_window and (not w or not self.key_shift):
            raise ResonaConfigError("ResonaConfig.read_window needs a query_window (> 0) and key_shift=True: the read "
                                    "pools the same last query_window tokens the search query does; set both, or read_window=False")
        w = self.read_coverage
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 256:
            raise ResonaConfigError(f"ResonaConfig.read_coverage must be an integer from 0 to 256, got {w!r}")
        if not isinstance(self.coverage_by_position, bool):
            raise ResonaConfigError(f"ResonaConfig.coverage_by_position must be true or false, got {self.coverage_by_position!r}")
        if self.coverage_by_position and not w:
            raise ResonaConfigError("ResonaConfig.coverage_by_position needs read_coverage (> 0), the window it counts "
                                    "copies over; set read_coverage, or coverage_by_position=False")
        if not isinstance(self.read_order, bool):
            raise ResonaConfigError(f"ResonaConfig.read_order must be true or false, got {self.read_order!r}")
        if self.read_order and self.train_top_k is not None and self.train_top_k != self.top_k:
            warnings.warn(f"ResonaConfig.read_order with train_top_k={self.train_top_k} and top_k={self.top_k}: the "
                          "order gate learns the ranks of the chunks read in training, and reading another number "
                          "of chunks lost 0.7 of MQAR's strict accuracy (docs/retrofit-learning.md); set "
                          "train_top_k equal to top_k", UserWarning, stacklevel=3)
        if self.read_shift not in (0, 1) or isinstance(self.read_shift, bool):
            raise ResonaConfigError(f"ResonaConfig.read_shift must be 0 or 1, got {self.read_shift!r}")
        if not isinstance(self.key_shift, bool):
            raise ResonaConfigError(f"ResonaConfig.key_shift must be true or false, got {self.key_shift!r}")
        for name in ("train_top_k", "query_tile", "num_heads", "head_dim", "search_dim"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.chunk_pool not in CHUNK_POOLS:
            raise ResonaConfigError(
                f"ResonaConfig.chunk_pool must be one of {', '.join(CHUNK_POOLS)}; got {self.chunk_pool!r}")
        if not isinstance(self.replace_attention, bool):
            raise ResonaConfigError(f"ResonaConfig.replace_attention must be true or false, got {self.replace_attention!r}")
        if self.mix not in MIX_MODES:
            raise ResonaConfigError(f"ResonaConfig.mix must be one of {', '.join(MIX_MODES)}; got {self.mix!r}")
        for name in ("score_scale", "lr_multiplier", "norm_eps", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ResonaConfigError(f"ResonaConfig.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name, (low, high, low_open) in FLOAT_RANGES.items():
            value = getattr(self, name)
            if value < low or (low_open and value == low) or value > high:
                raise ResonaConfigError(
                    f"ResonaConfig.{name} must lie in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
        if self.mix.startswith("paper") and not 0.0 < self.alpha < 1.0:
            raise ResonaConfigError(f"ResonaConfig.alpha must lie strictly between 0 and 1 for mix={self.mix!r}, "
                                    f"got {self.alpha!r}")

    def resolved(self, width: int) -> "ResonaConfig":
        """A copy with the automatic sizes (None) fixed for a model of this width."""
        return dataclasses.replace(
            self,
            num_heads=self.num_heads or max(1, width // 256),
            head_dim=self.head_dim or 64,
            search_dim=self.search_dim or min(64, width),
        )

    @property
    def function_preserving(self) -> bool:
        """True when a freshly injected branch leaves the model's outputs unchanged."""
        return self.mix in FUNCTION_PRESERVING_MIXES and not self.replace_attention

    def k_for(self, training: bool) -> int:
        """The number of chunks retrieved per query in training or inference mode."""
        return self.train_top_k if (training and self.train_top_k is not None) else self.top_k

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResonaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ResonaConfigError(
                f"unknown ResonaConfig field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "ResonaConfig":
        """The configuration a checkpoint recorded. Checkpoints store every field; one written before a
        field existed was trained without it, so the field takes its `LEGACY_DEFAULTS` value, not the
        current default (which would change what the trained branch computes)."""
        if not isinstance(data, dict):
            raise ResonaConfigError(f"a saved Resona configuration must be an object of field: value, got {data!r}")
        legacy = {name: value for name, value in LEGACY_DEFAULTS.items() if name not in data}
        return cls.from_dict({**legacy, **data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "ResonaConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ResonaConfigError(f"ResonaConfig JSON is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ResonaConfigError("ResonaConfig JSON must be an object of field: value")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ResonaConfig":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ResonaConfigError(f"cannot read the ResonaConfig file {path}: {exc}") from exc
        return cls.from_json(text)
