"""Checkpoint I/O of the Trainer: run.json, the resumable checkpoints (giants.train.checkpoint's format on one
device, sharded through torch.distributed.checkpoint under scale-out: giants.train.dcp), resuming from either,
and the final HF-format model directory.

CheckpointMixin is part of giants.train.trainer.Trainer and reads cfg, out, model, optimizer, param_names,
model_config, reader, tokenizer / _tokenizer_source, data_fingerprint, bf16, step, tokens_seen, last_val,
last_checkpoint and `dist`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from giants.train import checkpoint as ckpt
from giants.train.data import load_tokenizer
from giants.train.metrics import json_default, trim_metrics
from giants.train.optim import MasterAdamW


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@lru_cache(maxsize=4)
def cached_tokenizer(source: str) -> Any:
    return load_tokenizer(source)


class CheckpointMixin:
    def _masters_in_model(self):
        """Within: the model holds its fp32 master weights (checkpoint writes and loads see fp32)."""
        if isinstance(self.optimizer, MasterAdamW):
            return self.optimizer.masters_in_model()
        return contextlib.nullcontext()

    # ---- state ------------------------------------------------------------------------------------
    def run_signature(self) -> dict[str, Any]:
        """Settings that must match for a resume to continue the same run."""
        c = self.cfg
        return {"task": c.task, "data_fingerprint": self.data_fingerprint, "seq_len": c.seq_len,
                "batch_size": c.batch_size, "grad_accum": c.grad_accum, "seed": c.seed, "init": c.init,
                "lora_rank": c.lora_rank, "lora_alpha": c.lora_alpha, "lora_targets": list(c.lora_targets),
                "precision": "bf16" if self.bf16 else "fp32"}

    def _write_run_json(self) -> None:
        info = {"train_config": self.cfg.to_dict(), "model_config": self.model_config.to_dict(),
                "run": self.run_signature(), "device": str(self.device),
                "versions": {"torch": torch.__version__, "python": platform.python_version()},
                "flops_per_token": self.flops_per_token}
        if self.dist is not None:
            info["parallel"] = self.dist.to_dict()
        atomic_write(self.out / "run.json", json.dumps(info, indent=1, default=json_default))

    def data_state(self) -> dict[str, Any]:
        return self.reader.state_dict()

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint's state.json records besides the tensors."""
        return {"tokens_seen": self.tokens_seen, "data": self.data_state(), "last_val": self.last_val,
                "model_config": self.model_config.to_dict(), "run": self.run_signature(),
                "train_config": self.cfg.to_dict()}

    def save_checkpoint(self) -> Path:
        if self.dist is not None:
            from giants.train import dcp

            self.last_checkpoint = dcp.save(self)
            return self.last_checkpoint
        import giants
        from giants.train.lora import lora_parameters

        state = self.checkpoint_state()
        adapter = lora_parameters(self.model) if self.cfg.lora_rank else None
        tok = self._checkpoint_tokenizer()

        def write_model(d: Path) -> None:
            with self._masters_in_model():  # the fp32 master weights, not the bf16 compute copies
                giants.save(self.model, d, tokenizer=tok)

        path = ckpt.save(self.out, self.step, optimizer=self.optimizer, param_names=self.param_names, state=state,
                         write_model=write_model, adapter=adapter, keep_last=self.cfg.keep_last)
        self.last_checkpoint = path
        return path

    def _checkpoint_tokenizer(self) -> Any:
        if self.tokenizer is None and self._tokenizer_source:
            try:
                self.tokenizer = cached_tokenizer(self._tokenizer_source)
            except (OSError, ValueError):
                self._tokenizer_source = None  # save the weights without one rather than fail the run
        return self.tokenizer

    def _resume_path(self) -> Path:
        cfg = self.cfg
        if isinstance(cfg.resume, (str, os.PathLike)) and not isinstance(cfg.resume, bool):
            return Path(cfg.resume)
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            raise ckpt.TrainCheckpointError(f"{self.out}: no checkpoint to resume from (checkpoints/step_* "
                                            "with a manifest); refusing to start from scratch")
        return path

    def _resume(self) -> None:
        from giants.train import dcp

        path = self._resume_path()
        state = ckpt.verify(path)
        ckpt.check_compatible(state, {"model_config": self.model_config.to_dict(), "run": self.run_signature()},
                              path)
        if dcp.is_sharded(path):  # written under scale-out: any layout (or one process) reads it
            dcp.load(self, path)
        elif self.dist is not None:
            dcp.load_single_device_checkpoint(self, path, state)
        else:
            self._load_weights(path)
            try:
                ckpt.load_optimizer_state(self.optimizer, self.param_names,
                                          ckpt.read_tensors(path / "optimizer.safetensors"), state["optimizer"],
                                          path)
            except (KeyError, ValueError) as e:
                raise ckpt.TrainCheckpointError(f"{path}: {e}") from None
        try:
            self.reader.load_state_dict(state["data"])
        except (KeyError, ValueError) as e:
            raise ckpt.TrainCheckpointError(f"{path}: {e}") from None
        if (path / "rng.safetensors").exists():
            ckpt.set_rng_state(ckpt.read_tensors(path / "rng.safetensors"), state["rng"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.last_val = state.get("last_val")
        self.last_checkpoint = path
        # Keep metrics up to the checkpoint; later lines belong to the lost part of the interrupted run.
        mpath = self.out / "metrics.jsonl"
        if mpath.exists() and self.is_main:
            atomic_write(mpath, "".join(f"{ln}\n" for ln in trim_metrics(mpath, self.step)))

    def _load_weights(self, path: Path) -> None:
        """The model (or LoRA adapter) tensors of a one-device checkpoint, into the fp32 masters."""
        import giants
        from giants.train.lora import lora_parameters

        with torch.no_grad(), self._masters_in_model():  # load into the fp32 masters; bf16 copies follow on exit
            if self.cfg.lora_rank:
                tensors = ckpt.read_tensors(path / "adapter.safetensors")
                params = lora_parameters(self.model)
                if set(tensors) != set(params):
                    raise ckpt.TrainCheckpointError(f"{path}: adapter tensors do not match this run's LoRA setup")
                for n, p in params.items():
                    p.copy_(tensors[n])
                return
            try:
                loaded = giants.load(path / "model")
            except Exception as e:  # noqa: BLE001 - any reader failure means an unusable checkpoint
                raise ckpt.TrainCheckpointError(f"{path / 'model'}: cannot load the model: {e}") from e
            sd = loaded.state_dict()
            live = self.model.state_dict()
            if set(sd) != set(live):
                raise ckpt.TrainCheckpointError(f"{path / 'model'}: tensors differ from this model's")
            for k, v in live.items():
                if v.shape != sd[k].shape:
                    raise ckpt.TrainCheckpointError(f"{path / 'model'}: tensor {k} has shape "
                                                    f"{tuple(sd[k].shape)}, model has {tuple(v.shape)}")
                v.copy_(sd[k])

    # ---- the end of the run ---------------------------------------------------------------------
    def save_final(self) -> Path:
        """The trained model as an HF-format directory (LoRA adapters merged in)."""
        import giants
        from giants.train.lora import has_lora, merge_lora

        if self.dist is not None:
            from giants.train import dcp

            return dcp.export_final(self)
        model = self.model
        if has_lora(model):
            model = merge_lora(copy.deepcopy(model))
        dest = self.out / "final"
        with self._masters_in_model():
            giants.save(model, dest, tokenizer=self._checkpoint_tokenizer())
        return dest

