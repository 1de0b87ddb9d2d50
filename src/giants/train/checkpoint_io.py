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
import shutil
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from giants.checkpoint.saving import MARKER
from giants.train import checkpoint as ckpt
from giants.train.data import load_tokenizer
from giants.train.metrics import json_default, trim_metrics
from giants.train.optim import MasterAdamW

# what garbage in a checkpoint's state.json raises when read: turned into TrainCheckpointError naming the file
BAD_STATE = (KeyError, ValueError, TypeError, AttributeError, IndexError, OverflowError)


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

            self.checkpoint_written(dcp.save(self))
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
        self.checkpoint_written(path)
        return path

    def checkpoint_written(self, path: Path) -> None:
        self.last_checkpoint = path
        self.saved_step = self.step
        self.ckpt_clock = time.monotonic()  # the --ckpt-minutes interval counts from here

    def _checkpoint_tokenizer(self) -> Any:
        if self.tokenizer is None and self._tokenizer_source:
            try:
                self.tokenizer = cached_tokenizer(self._tokenizer_source)
            except (OSError, ValueError):
                self._tokenizer_source = None  # save the weights without one rather than fail the run
        return self.tokenizer

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from: the one named, else the newest in the run directory, else None (nothing
        written yet: the run starts from step 0)."""
        cfg = self.cfg
        if isinstance(cfg.resume, (str, os.PathLike)) and not isinstance(cfg.resume, bool):
            return Path(cfg.resume)
        return ckpt.latest_checkpoint(self.out)

    def _resume(self) -> None:
        from giants.train import dcp

        path = self._resume_path()
        mpath = self.out / "metrics.jsonl"
        if path is None:
            # killed (or stopped) before its first checkpoint: nothing to continue, so the run starts over, saying so
            # (a restart loop that always passes --resume must not fail forever)
            if self.is_main:
                print(f"giants train: {self.out}: no checkpoint to resume from (none written yet); starting the run "
                      "from step 0", file=sys.stderr, flush=True)
                if mpath.exists():
                    atomic_write(mpath, "")
            return
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
            except BAD_STATE as e:
                raise ckpt.TrainCheckpointError(f"{path / 'state.json'}: unusable optimizer state "
                                                f"({type(e).__name__}: {e})") from None
        try:
            self.reader.load_state_dict(state["data"])
            tokens = int(state["tokens_seen"])
            last_val = state.get("last_val")
            if last_val is not None:
                last_val = float(last_val)
        except BAD_STATE as e:
            raise ckpt.TrainCheckpointError(f"{path / 'state.json'}: unusable data position or counters "
                                            f"({type(e).__name__}: {e})") from None
        if (path / "rng.safetensors").exists():
            ckpt.set_rng_state(ckpt.read_tensors(path / "rng.safetensors"), state.get("rng"), path)
        self.step = int(state["step"])
        self.tokens_seen = tokens
        self.last_val = last_val
        self.last_checkpoint = path
        self.saved_step = self.step
        # Keep metrics up to the checkpoint; later lines belong to the lost part of the interrupted run.
        if mpath.exists() and self.is_main:
            kept = trim_metrics(mpath, self.step)
            atomic_write(mpath, "".join(f"{ln}\n" for ln in kept))
            if kept:
                try:
                    self.resumed_metrics = json.loads(kept[-1])
                except json.JSONDecodeError:
                    pass

    # ---- a run directory's leftovers ------------------------------------------------------------
    def clear_previous_run(self) -> None:
        """--overwrite: remove what an earlier `giants train` wrote in the run directory (checkpoints, metrics,
        run.json, summary.json, TensorBoard events, the final model when giants wrote it); nothing else."""
        from giants.checkpoint.saving import check_destination

        final = self.out / "final"
        if final.exists():
            try:
                check_destination(final)
            except FileExistsError as e:
                raise ValueError(f"--overwrite: {e}") from None
        root = ckpt.checkpoints_dir(self.out)
        if root.is_dir():
            for p in root.iterdir():
                if p.is_dir() and (ckpt.STEP_DIR.match(p.name) or p.name.startswith(".tmp-")):
                    shutil.rmtree(p)
            with contextlib.suppress(OSError):
                root.rmdir()  # (only when empty)
        for name in ("metrics.jsonl", "summary.json", "run.json", "curves.png"):
            with contextlib.suppress(FileNotFoundError):
                (self.out / name).unlink()
        for p in (self.out / "tensorboard").glob("events.out.tfevents.*"):
            p.unlink()
        if final.exists():
            shutil.rmtree(final)
        self.clean_stale_exports()

    def clean_stale_exports(self) -> None:
        """Temporary directories of a final export that was killed (giants.save assembles RUN_DIR/.final.tmp-*)."""
        for p in self.out.glob(".final.tmp-*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)

    def final_pending(self) -> bool:
        """Whether the run has trained every step but its final model was never completely written (killed or
        stopped during the export): resuming finishes it. The export is complete once summary.json says so."""
        if not self.cfg.save_final or self.step < self.cfg.steps:
            return False
        try:
            done = json.loads((self.out / "summary.json").read_text())
        except (OSError, ValueError):
            done = None
        complete = (isinstance(done, dict) and done.get("step") == self.step and bool(done.get("final"))
                    and (self.out / "final" / MARKER).is_file())
        return not complete

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

