"""Parallel layouts: the degrees of a job, checked against a model before anything is allocated, and the
one table of how each parameter is split under tensor / expert parallelism.

Training (`giants.parallel.train_plan`, DTensor) and inference (`giants.inference` TP workers, plain
all-reduce) both read `tp_split` / `ep_split` from here, so the sharding is decided in one place.
This module imports no torch.distributed: it runs in the launcher before any process group exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from giants.config import ModelConfig

PP_SCHEDULES = ("1f1b", "interleaved1f1b", "gpipe")


class LayoutError(ValueError):
    """A layout that cannot divide the model or the world; the message names the field and the numbers."""


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of one job. world = pp * dp_replicate * dp_shard * tp. Expert parallelism borrows its ranks
    from the data-parallel shard dimension (as torchtitan does): ep divides dp_shard."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_schedule: str = "1f1b"
    pp_stages_per_rank: int = 0  # 0 = 1 for 1f1b/gpipe, 2 for interleaved1f1b

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def stages_per_rank(self) -> int:
        if self.pp_stages_per_rank:
            return self.pp_stages_per_rank
        return 2 if self.pp_schedule == "interleaved1f1b" else 1

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @classmethod
    def infer(cls, world_size: int, *, dp_replicate: int = 1, dp_shard: int = -1, tp: int = 1, pp: int = 1,
              ep: int = 1, pp_schedule: str = "1f1b", pp_stages_per_rank: int = 0) -> ParallelDims:
        """dp_shard=-1 takes whatever the other degrees leave of the world (torchtitan's convention)."""
        for name, v in (("dp_replicate", dp_replicate), ("tp", tp), ("pp", pp), ("ep", ep)):
            if not isinstance(v, int) or v < 1:
                raise LayoutError(f"--{name.replace('_', '-')} must be a positive integer (got {v!r})")
        if dp_shard == -1:
            rest = dp_replicate * tp * pp
            if world_size % rest:
                raise LayoutError(f"world size {world_size} is not divisible by dp_replicate*tp*pp = "
                                  f"{dp_replicate}*{tp}*{pp} = {rest}")
            dp_shard = world_size // rest
        dims = cls(dp_replicate, dp_shard, tp, pp, ep, pp_schedule, pp_stages_per_rank)
        dims.check_world(world_size)
        return dims

    def check_world(self, world_size: int) -> None:
        if self.dp_shard < 1:
            raise LayoutError(f"--dp-shard must be a positive integer (got {self.dp_shard})")
        if self.world_size != world_size:
            raise LayoutError(f"degrees multiply to pp*dp_replicate*dp_shard*tp = {self.pp}*{self.dp_replicate}*"
                              f"{self.dp_shard}*{self.tp} = {self.world_size}, but the world size is {world_size}")
        if self.ep > 1 and self.dp_shard % self.ep:
            raise LayoutError(f"--ep {self.ep} must divide --dp-shard {self.dp_shard} (expert parallelism borrows "
                              f"the data-parallel shard ranks)")
        if self.pp_schedule not in PP_SCHEDULES:
            raise LayoutError(f"--pp-schedule {self.pp_schedule!r} is not one of {PP_SCHEDULES}")
        if self.pp_schedule == "interleaved1f1b" and self.pp > 1 and self.stages_per_rank < 2:
            raise LayoutError("--pp-schedule interleaved1f1b needs at least 2 stages per rank")

    def check_model(self, cfg: ModelConfig) -> None:
        """Refuse a layout the model cannot be divided by, naming the field and the numbers."""
        check_tp(cfg, self.tp)
        if self.ep > 1:
            if not cfg.is_moe:
                raise LayoutError(f"--ep {self.ep}: the model is dense (n_experts=0); expert parallelism needs MoE")
            if cfg.n_experts % self.ep:
                raise LayoutError(f"--ep {self.ep} does not divide n_experts={cfg.n_experts}")
        if self.pp > 1 and cfg.n_layers < self.n_stages:
            raise LayoutError(f"--pp {self.pp} with {self.stages_per_rank} stage(s) per rank needs "
                              f"{self.n_stages} stages, more than n_layers={cfg.n_layers}")


def check_tp(cfg: ModelConfig, tp: int, *, vocab: bool = True, replicate_kv: bool = False) -> None:
    """Tensor parallelism splits heads, KV heads and FFN columns evenly (and the vocabulary, for the
    vocab-parallel embedding and head); refuse anything that does not divide.
    replicate_kv (inference): when tp exceeds n_kv_heads, ranks share KV heads (each holds a copy of the one
    its query heads read, as vLLM does); tp must then be a multiple of n_kv_heads."""
    if not isinstance(tp, int) or tp < 1:
        raise LayoutError(f"tensor parallel size must be a positive integer (got {tp!r})")
    if tp == 1:
        return
    kv = ("n_kv_heads",) if not (replicate_kv and tp > cfg.n_kv_heads) else ()
    for name in ("n_heads",) + kv + ("ffn_dim",) + (("vocab_size",) if vocab else ()):
        v = getattr(cfg, name)
        if v % tp:
            raise LayoutError(f"tensor parallel size {tp} does not divide {name}={v}")
    if not kv and tp % cfg.n_kv_heads:
        raise LayoutError(f"tensor parallel size {tp} exceeds n_kv_heads={cfg.n_kv_heads} and is not a multiple "
                          f"of it, so KV heads cannot be replicated evenly")


# ---- the split table --------------------------------------------------------------------------------------
# Each entry: a regex over the parameter's name (the model's own names) -> the dim split across TP ranks,
# or None for replicated. Column-parallel layers split their output rows (dim 0 of an nn.Linear weight and
# its bias); row-parallel layers split their input columns (dim 1) and keep the bias whole (added once,
# after the all-reduce). Heads-shaped tensors (sinks, the T5 bias table) split with their heads.
_TP_RULES: list[tuple[re.Pattern[str], int | None]] = [
    (re.compile(r"embed\.weight$"), 0),  # vocab-parallel
    (re.compile(r"lm_head\.weight$"), 0),  # vocab-parallel head
    (re.compile(r"attn\.(q|k|v)_proj\.(weight|bias)$"), 0),
    (re.compile(r"attn\.o_proj\.weight$"), 1),
    (re.compile(r"attn\.o_proj\.bias$"), None),
    (re.compile(r"attn\.sinks$"), 0),
    (re.compile(r"rel_bias\.weight$"), 1),  # (buckets, heads)
    (re.compile(r"mlp\.(gate|up)_proj\.(weight|bias)$"), 0),
    (re.compile(r"mlp\.down_proj\.weight$"), 1),
    (re.compile(r"mlp\.down_proj\.bias$"), None),
    # MoE under TP: columns inside every expert (each rank computes every token's experts on its F slice)
    (re.compile(r"mlp\.w_(gate|up)$"), 1),  # (E, F, D)
    (re.compile(r"mlp\.b_(gate|up)$"), 1),  # (E, F)
    (re.compile(r"mlp\.w_down$"), 2),  # (E, D, F)
    (re.compile(r"mlp\.b_down$"), None),
    (re.compile(r"mlp\.router\.(weight|bias)$"), None),
    (re.compile(r"norm\.weight$|norm\.bias$"), None),
]

_EP_RULES: list[tuple[re.Pattern[str], int | None]] = [
    (re.compile(r"mlp\.(w_gate|w_up|w_down|b_gate|b_up|b_down)$"), 0),  # experts on dim 0
]


def tp_split(name: str) -> int | None:
    """The dim of parameter `name` split over tensor-parallel ranks, or None if every rank holds it whole."""
    for pat, dim in _TP_RULES:
        if pat.search(name):
            return dim
    raise LayoutError(f"no tensor-parallel rule for parameter {name!r}; add one to giants.parallel.layout")


def ep_split(name: str) -> int | None:
    """The dim split over expert-parallel ranks (experts), or None for parameters outside the experts."""
    for pat, dim in _EP_RULES:
        if pat.search(name):
            return dim
    return None


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of `rank`'s even share of `size` elements; the layout checks guarantee divisibility."""
    if size % world:
        raise LayoutError(f"cannot split a dimension of {size} evenly over {world} ranks")
    step = size // world
    return rank * step, (rank + 1) * step


# ---- inference TP: one rank's share, read from the table above -----------------------------------------
_KV = re.compile(r"attn\.(k|v)_proj\.(weight|bias)$")
# Replicated parameters that sit inside a sum over ranks (row-parallel biases): added by one rank only.
_AFTER_REDUCE = re.compile(r"attn\.o_proj\.bias$|mlp\.down_proj\.bias$|mlp\.b_down$")


def tp_kv_heads(cfg: ModelConfig, tp: int) -> int:
    """KV heads one rank holds: n_kv_heads / tp, or 1 when ranks share (replicate) KV heads."""
    return max(1, cfg.n_kv_heads // tp)


def tp_local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config of one rank's modules: its heads, KV heads and FFN columns. vocab_size stays whole (token
    ids are validated against it); the vocab-parallel embedding and head are sized by `tp_shard`."""
    check_tp(cfg, tp, replicate_kv=True)
    return cfg.replace(n_heads=cfg.n_heads // tp, n_kv_heads=tp_kv_heads(cfg, tp), ffn_dim=cfg.ffn_dim // tp)


def tp_shard(cfg: ModelConfig, name: str, shape: tuple[int, ...], rank: int, tp: int) -> tuple[int, int, int] | None:
    """(dim, start, end) of parameter `name` (full shape `shape`) held by `rank` of `tp`, or None when every
    rank holds it whole. K/V projections of a model with fewer KV heads than ranks give each rank the KV head
    its query heads read (rank // (tp / n_kv_heads))."""
    dim = tp_split(name)
    if dim is None or tp == 1:
        return None
    if _KV.search(name) and tp > cfg.n_kv_heads:
        head = rank // (tp // cfg.n_kv_heads)
        return dim, head * cfg.head_dim, (head + 1) * cfg.head_dim
    return (dim, *shard_range(shape[dim], rank, tp))


def tp_reduced_bias(name: str) -> bool:
    """A whole (unsplit) bias added inside a sum over ranks: rank 0 adds it, the others hold zeros."""
    return bool(_AFTER_REDUCE.search(name))
