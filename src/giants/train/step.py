"""One optimizer step on one device: the losses of a micro-batch (causal LM, SFT, DPO), gradient accumulation,
clipping, the update, and the step's metrics; evaluation.

StepMixin is part of giants.train.trainer.Trainer and reads what the Trainer assembles: cfg, model, forward,
reference, optimizer, train_params, loss_fn (maybe compiled `_lm_loss`), tied_head, _linear_ce, reader,
val_reader / val_items, pad_id, device, autocast_dtype, residual_bf16, aux_coef, z_coef, warmup, step,
tokens_seen, last_checkpoint, and `dist` (None here; giants.train.distributed takes the step over when set).

Gradient accumulation weights each micro-batch by its share of the step's targets: the step's loss is the sum of
every target's loss over all its micro-batches divided by the number of targets (target tokens for LM and SFT,
pairs for DPO), as one batch of grad_accum x batch_size would give. For SFT the target counts differ from
micro-batch to micro-batch, so all of a step's micro-batches are read (and counted) before the first forward;
a plain mean of per-micro-batch means would weight a short answer's tokens like a long one's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from giants.train.config import TrainingDiverged
from giants.train.losses import (
    IGNORE_INDEX,
    RouterLosses,
    balance_score,
    causal_lm_loss,
    chunked_lm_loss,
    dpo_loss,
    router_losses,
    sequence_logprobs,
)
from giants.train.optim import MasterAdamW, grad_norm
from giants.train.schedule import lr_at
from giants.train.tied_head import scatter_embedding_grad, tied_logits


@dataclass
class Launched:
    """A queued optimizer step: what it reports, copied back from the device once `ready` has fired."""

    step: int
    lr: float
    tokens: int
    tokens_before: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    ready: Any = None  # torch.cuda.Event on CUDA
    launched_at: float = 0.0
    deferred: bool = False  # its non-finite check waits for the values (the device skipped a bad update)
    div: int = 1  # the loss scalars are sums of `div` equal shares


@dataclass
class Micro:
    """One micro-batch as read, before its forward. targets: what its loss averages over, for the whole job's
    micro-batch (LM and SFT: target tokens; DPO: pairs); local: this rank's share of them (= targets on one
    device); tokens: the tokens it holds (throughput)."""

    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    pairs: list[Any] | None = None
    targets: int = 0
    local: int = 0
    tokens: int = 0


class StepMixin:
    # ---- losses --------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _rope(self, T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables for positions 0..T-1 (every training row starts at 0), computed once, eagerly: as an
        input of the compiled loss they are one small tensor the layers read. Computed inside, inductor inlined
        cos/sin into every layer's q and k kernels (~3 ms a step at Llama-3.2-1B shape on an H200); kept out
        of it by a graph break, the embedding and the tied head fell into different graphs and their gradients
        were summed outside (another 0.7 ms)."""
        rotary = getattr(self.model, "rotary", None)
        if rotary is None:
            return None
        key = (T, self.model.embed.weight.dtype)
        if key not in self._rope_cache:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                pos = torch.arange(T, device=self.device)[None]
                self._rope_cache = {key: rotary(pos, self.model.embed.weight.dtype)}
        return self._rope_cache[key]

    def _lm_loss(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None, embeds: torch.Tensor | None = None,
                 head_lowp: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Forward + losses as one function of tensors, so torch.compile sees the loss too (the fp32
        cross-entropy over the vocabulary fuses with the head instead of materialising fp32 logits).
        embeds, head_lowp: the looked-up input embeddings and the bf16 copy of the tied head weight (see
        `_lm_micro`). Returns (loss, ce) or, for MoE, (loss, ce, aux, z, per-layer aux, per-layer z, utilisation)."""
        mc = self.model_config
        with self._autocast():
            if self.residual_bf16 and embeds is None:
                embeds = self.model.embed(x).to(torch.bfloat16)
            out = self.model(x, output_router_logits=mc.is_moe, check=False, return_hidden=True, rope=rope,
                             inputs_embeds=embeds)
            hidden, router_logits = out if mc.is_moe else (out, None)
            if head_lowp is None:
                head = self.model.logits
            else:
                weight = self.model.embed.weight

                def head(h: torch.Tensor) -> torch.Tensor:
                    return self.model.logits(h, project=lambda t: tied_logits(t, weight, head_lowp))
            fused = self._fused_head(head_lowp)
            if fused is not None:
                # the head and the loss as one op: the logits' gradient is formed in the forward
                ce = self._linear_ce(hidden, *fused, y, IGNORE_INDEX)
            elif self.device.type == "cpu":
                # the head and loss a block of rows at a time: far fewer page faults than full logits
                ce = chunked_lm_loss(head, hidden, y, mc.vocab_size)
            else:
                ce = causal_lm_loss(head(hidden), y)
            if not router_logits:
                return ce, ce.detach()
            rl = router_losses(router_logits, mc.experts_per_token, mask)
            loss = ce
            if self.aux_coef:
                loss = loss + self.aux_coef * rl.aux_loss
            if self.z_coef:
                loss = loss + self.z_coef * rl.z_loss
            return (loss, ce.detach(), rl.aux_loss.detach(), rl.z_loss.detach(), rl.per_layer_aux, rl.per_layer_z,
                    rl.utilisation)

    def _fused_head(self, head_lowp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight, its compute-dtype copy) when the head and the loss run as one op (giants.train.cross_entropy.
        linear_cross_entropy): on FUSED_HEAD_CE_DEVICES, no final soft-cap, and a head weight that is already in
        bf16 (master weights) or has the optimizer's bf16 copy (the tied head)."""
        if self._linear_ce is None or self.model_config.final_softcap is not None:
            return None
        if head_lowp is not None:
            return self.model.embed.weight, head_lowp
        lm = getattr(self.model, "lm_head", None)
        if type(lm) is torch.nn.Linear and lm.bias is None and lm.weight.dtype == torch.bfloat16:
            return lm.weight, lm.weight.detach()
        return None

    def _lm_micro(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
        tied = self.tied_head
        if tied is None:
            out = self.loss_fn(x, y, mask, self._rope(x.shape[1]))
            info: dict[str, Any] = {"ce": out[1]}
        else:
            # the lookup outside the graph: its gradient rows are added into the head's fp32 weight gradient right
            # after the backward (`_launch_step`) instead of a zero-filled (V, D) gradient summed with it
            low = self.optimizer.shadow_of(tied)
            with torch.no_grad():  # bf16 rows of the bf16 copy: the master's rows rounded to bf16
                embeds = torch.nn.functional.embedding(x, low if self.residual_bf16 else tied)
            embeds.requires_grad_(True)
            out = self.loss_fn(x, y, mask, self._rope(x.shape[1]), embeds, low)
            info = {"ce": out[1], "lookup": (tied, x, embeds)}
        if len(out) > 2:
            info["router"] = RouterLosses(*out[2:])
        return out[0], info


    def _dpo_micro(self, pairs: list[Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        from giants.train.finetune_data import collate
        from giants.train.lora import lora_disabled

        examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        ids, labels, mask = collate(examples, self.cfg.seq_len, self.pad_id)
        ids, labels = ids.to(self.device), labels.to(self.device)
        B = len(pairs)
        with self._autocast():
            logp = sequence_logprobs(self.forward(ids, check=False), labels)
            with torch.no_grad():
                if self.reference is not None:
                    ref = sequence_logprobs(self.reference(ids, check=False), labels)
                else:
                    with lora_disabled(self.model):
                        ref = sequence_logprobs(self.model(ids, check=False), labels)
        out = dpo_loss(logp[:B], logp[B:], ref[:B], ref[B:], self.cfg.dpo_beta)
        return out.loss, {"ce": out.loss.detach(), "margin": out.margin, "accuracy": out.accuracy}

    # ---- micro-batches ---------------------------------------------------------------------------
    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a micro-batch the whole job reads (all of them on one device)."""
        return t if self.dist is None else self.dist.rows(t)

    def _read_micro(self) -> Micro:
        """The next micro-batch from the reader, on the device (this rank's rows of it)."""
        cfg = self.cfg
        if cfg.task == "lm":
            x, y = self.reader.next_batch()
            n = x.numel()
            x, y = self._rows(x), self._rows(y)
            if self.device.type == "cuda":
                # from pageable memory the copy would wait for the previous step's optimizer to finish, leaving the
                # GPU idle while this step's first kernels are launched; from pinned memory it queues behind it
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return Micro(x=x, y=y, targets=n, local=x.numel(), tokens=n)
        if cfg.task == "sft":
            from giants.train.finetune_data import collate

            ids, labels, mask = collate(self.reader.next_items(), cfg.seq_len, self.pad_id)
            targets = int((labels != IGNORE_INDEX).sum())
            if not targets:
                raise ValueError("an SFT batch has no assistant tokens within seq_len; raise --seq-len")
            tokens = int(mask.sum())
            if self.dist is not None:
                from giants.train.distributed import pad_rows

                ids, labels, mask = pad_rows(ids, labels, mask, self.dist.pad_len(ids.shape[1]), self.pad_id)
                ids, labels, mask = self._rows(ids), self._rows(labels), self._rows(mask)
            return Micro(x=ids.to(self.device), y=labels.to(self.device), mask=mask.to(self.device), targets=targets,
                         local=int((labels != IGNORE_INDEX).sum()), tokens=tokens)
        pairs = self.reader.next_items()
        tokens = sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)
        mine = pairs if self.dist is None else self.dist.items(pairs)
        return Micro(pairs=mine, targets=len(pairs), local=len(mine), tokens=tokens)

    def _micro_loss(self, micro: Micro) -> tuple[torch.Tensor, dict[str, Any]]:
        """The micro-batch's loss: the mean over its targets (plus the router losses), and what it reports."""
        if micro.pairs is not None:
            return self._dpo_micro(micro.pairs)
        return self._lm_micro(micro.x, micro.y, micro.mask)

    def _next_micro(self) -> tuple[torch.Tensor, dict[str, Any], int]:
        """Read and run the next micro-batch: (its mean loss, what it reports, its tokens)."""
        micro = self._read_micro()
        loss, info = self._micro_loss(micro)
        return loss, info, micro.tokens

    def _step_micros(self) -> tuple[list[Micro] | None, int | None]:
        """SFT and DPO: the step's micro-batches, read up front, and their targets in total (the loss's
        denominator). LM: (None, None), every micro-batch holds the same number of targets (read one at a time)."""
        if self.cfg.task == "lm":
            return None, None
        micros = [self._read_micro() for _ in range(self.cfg.grad_accum)]
        return micros, sum(m.targets for m in micros)

    # ---- the step --------------------------------------------------------------------------------
    def _fused_optimizer(self) -> bool:
        """Whether the optimizer takes grad_scale and found_inf (torch's fused AdamW, MasterAdamW). With found_inf
        the non-finite check can wait for the step's scalars to come back on their own: no host sync inside a
        CUDA step. (On CPU the same path runs, so the tests cover it; there the values are simply ready.)
        Otherwise the check runs before the update."""
        opt = self.optimizer
        return isinstance(opt, MasterAdamW) or all(g.get("fused") for g in opt.param_groups)

    def _set_lr(self) -> float:
        cfg = self.cfg
        lr = lr_at(self.step, base_lr=cfg.lr, total_steps=cfg.steps, warmup_steps=self.warmup,
                   schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches. Returns the step's metrics."""
        return self._finish_step(self._launch_step())

    def _launch_step(self) -> Launched:
        """Queue one optimizer step. With a fused optimizer nothing here waits for the GPU: the step's scalars
        are copied back asynchronously and read in `_finish_step`, and a non-finite loss or gradient norm turns
        the update (and every later one) into a no-op on the device through the optimizer's `found_inf`.
        Otherwise the scalars are read before the update, which is then skipped on the host."""
        if self.dist is not None:
            return self.dist.launch_step(self)
        cfg = self.cfg
        self.model.train()
        lr = self._set_lr()
        ce_sum = torch.zeros((), device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        extras: list[dict[str, Any]] = []
        accumulate = cfg.grad_accum > 1 and isinstance(self.optimizer, MasterAdamW)
        micros, total = self._step_micros()
        for i in range(cfg.grad_accum):
            micro = micros[i] if micros is not None else self._read_micro()
            loss, info = self._micro_loss(micro)
            if total is None:
                (loss / cfg.grad_accum).backward()
                ce_sum += info["ce"].float()
                loss_sum += loss.detach().float()
            else:  # this micro-batch's share of the step's targets
                share = micro.local / total
                (loss * share).backward()
                ce_sum += info["ce"].float() * share
                loss_sum += loss.detach().float() * share
            if "lookup" in info:
                scatter_embedding_grad(*info.pop("lookup"))
            if accumulate:
                # bf16 weights get bf16 .grad: the micro-batches are summed in fp32 in the optimizer instead, as
                # autocast over fp32 weights sums them
                self.optimizer.accumulate()
            tokens += micro.tokens
            extras.append(info)
        params = self.train_params
        if isinstance(self.optimizer, MasterAdamW):
            grads = self.optimizer.grads()
        else:
            grads = [p.grad for p in params if p.grad is not None]
        fused = self._fused_optimizer()
        fold_clip = cfg.grad_clip > 0 and fused and (self.device.type == "cuda" or isinstance(self.optimizer,
                                                                                              MasterAdamW))
        if cfg.grad_clip > 0 and not fold_clip:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = grad_norm(grads)  # fp32 sums, also over bf16 gradients
            if fold_clip:
                # The clip's scale rides in the optimizer's kernel (it divides each gradient by grad_scale as it
                # reads it) instead of a separate read-modify-write pass over every gradient.
                self.optimizer.grad_scale = torch.clamp((gnorm.float() + 1e-6) / cfg.grad_clip, min=1.0)
        scalars = torch.stack([loss_sum.float(), gnorm.detach().float(), ce_sum.float()])
        # LM: the sums of grad_accum equal shares, divided on the host (SFT, DPO: already weighted)
        rec = Launched(step=self.step + 1, lr=lr, tokens=tokens, tokens_before=self.tokens_seen,
                       div=cfg.grad_accum if total is None else 1)
        rec.deferred = fused
        if fused:
            # sticky: after a non-finite step no later step updates either, so the model stays as it was
            bad = (~torch.isfinite(scalars[:2])).any().float()
            torch.maximum(self._diverged, bad, out=self._diverged)
            self.optimizer.found_inf = self._diverged
        else:
            loss_f, gnorm_v, _ = scalars.tolist()
            if not (math.isfinite(loss_f) and math.isfinite(gnorm_v)):
                self.optimizer.grad_scale = None
                self.optimizer.zero_grad(set_to_none=True)
                self._diverged_error(rec, loss_f / rec.div, gnorm_v)
        self.optimizer.step()
        self.optimizer.grad_scale = None
        self.optimizer.found_inf = None
        self.optimizer.zero_grad(set_to_none=True)
        return self._launched(rec, scalars, extras)

    def _launched(self, rec: Launched, scalars: torch.Tensor, extras: list[dict[str, Any]]) -> Launched:
        """Count the step and queue the copy of everything it reports (reduced on the device, no waiting)."""
        cfg = self.cfg
        self.step += 1
        self.tokens_seen += rec.tokens
        out: dict[str, torch.Tensor] = {"scalars": scalars}
        routers = [e["router"] for e in extras if "router" in e]
        if routers:
            out["aux_loss"] = torch.stack([r.aux_loss.detach() for r in routers]).mean()
            out["z_loss"] = torch.stack([r.z_loss.detach() for r in routers]).mean()
            out["per_layer_aux"] = torch.stack([r.per_layer_aux for r in routers]).mean(0)
            out["per_layer_z"] = torch.stack([r.per_layer_z for r in routers]).mean(0)
            util = torch.stack([r.utilisation for r in routers]).mean(0)  # (L, E)
            out["utilisation"] = util
            out["balance"] = balance_score(util)
        if cfg.task == "dpo":
            out["margin"] = torch.stack([e["margin"] for e in extras]).mean()
            out["accuracy"] = torch.stack([e["accuracy"] for e in extras]).mean()
        if self.device.type == "cuda":
            rec.values = {k: v.detach().float().to("cpu", non_blocking=True) for k, v in out.items()}
            rec.ready = torch.cuda.Event()
            rec.ready.record()
        else:
            rec.values = {k: v.detach().float() for k, v in out.items()}
        rec.launched_at = time.perf_counter()
        return rec

    def _diverged_error(self, rec: Launched, loss_v: float, gnorm_v: float) -> None:
        where = str(self.last_checkpoint) if self.last_checkpoint else "none written yet"
        what = "loss" if not math.isfinite(loss_v) else "gradient norm"
        raise TrainingDiverged(f"non-finite {what} ({loss_v if what == 'loss' else gnorm_v}) at step "
                               f"{rec.step}: training stopped without saving; last good checkpoint: "
                               f"{where}. Resume from it with a lower --lr or stronger --grad-clip")

    def _finish_step(self, rec: Launched) -> dict[str, Any]:
        """Wait for a launched step's scalars and turn them into its metrics."""
        if rec.ready is not None:
            rec.ready.synchronize()  # this step's work only: a step launched after it may still be running
        v = rec.values
        loss_f, gnorm_v, ce_f = v["scalars"].tolist()
        if not (math.isfinite(loss_f) and math.isfinite(gnorm_v)):
            # the device skipped this update and every later one: the model is as it was before this step
            self.step, self.tokens_seen = rec.step - 1, rec.tokens_before
            self._diverged_error(rec, loss_f / rec.div, gnorm_v)
        m: dict[str, Any] = {"step": rec.step, "train_loss": ce_f / rec.div, "loss": loss_f / rec.div, "lr": rec.lr,
                             "grad_norm": gnorm_v, "tokens": rec.tokens_before + rec.tokens, "_tokens": rec.tokens}
        if "aux_loss" in v:
            m["aux_loss"] = float(v["aux_loss"])
            m["z_loss"] = float(v["z_loss"])
            m["router"] = {k: v[src].tolist() for k, src in (("aux_loss", "per_layer_aux"), ("z_loss", "per_layer_z"),
                                                               ("utilisation", "utilisation"), ("balance", "balance"))}
        if "margin" in v:
            m["margin"] = float(v["margin"])
            m["accuracy"] = float(v["accuracy"])
        return m

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean next-token loss over the first eval_batches batches of the validation data."""
        if self.dist is not None:
            return self.dist.evaluate(self)
        cfg = self.cfg
        self.model.eval()
        total, count = 0.0, 0
        try:
            if cfg.task == "lm" and self.val_reader is not None:
                n = min(cfg.eval_batches * cfg.batch_size, self.val_reader.n_windows)
                for start in range(0, n, cfg.batch_size):
                    windows = torch.arange(start, min(n, start + cfg.batch_size)).numpy()
                    x, y = self.val_reader.rows(windows)
                    with self._autocast():
                        logits = self.forward(x.to(self.device), check=False)
                    total += float(causal_lm_loss(logits, y.to(self.device))) * x.numel()
                    count += x.numel()
            elif cfg.task in ("sft", "dpo") and getattr(self, "val_items", None):
                from giants.train.finetune_data import collate

                items = self.val_items[:cfg.eval_batches * cfg.batch_size]
                if cfg.task == "dpo":
                    margins = []
                    for i in range(0, len(items), cfg.batch_size):
                        _, info = self._dpo_micro(items[i:i + cfg.batch_size])
                        margins.append(float(info["margin"]))
                    return {"val_margin": sum(margins) / len(margins)}
                for i in range(0, len(items), cfg.batch_size):
                    ids, labels, _ = collate(items[i:i + cfg.batch_size], cfg.seq_len, self.pad_id)
                    k = int((labels != IGNORE_INDEX).sum())
                    if not k:
                        continue
                    with self._autocast():
                        logits = self.forward(ids.to(self.device), check=False)
                    total += float(causal_lm_loss(logits, labels.to(self.device))) * k
                    count += k
            else:
                return None
        finally:
            self.model.train()
        if not count:
            return None
        val = total / count
        self.last_val = val
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

