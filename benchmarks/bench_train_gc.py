"""Per-step training throughput with and without freezing the garbage collector's objects after the first step
(Llama-3.2-1B shape, seq 2048, micro-batch 4, compiled, one log line per step): do periodic slow steps come from
full collections walking torch.compile's objects?

    python benchmarks/bench_train_gc.py [--steps 20]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import giants
from bench_train import make_data
from giants.train.trainer import TrainConfig, Trainer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    cfg = giants.get_config("tiny-llama" if args.smoke else "llama-3.2-1b")
    seq = 32 if args.smoke else 2048
    real_freeze = gc.freeze
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), cfg.vocab_size, (2 * args.steps + 8) * 4 * (seq + 1) * 2)
        (Path(tmp) / "m.json").write_text(json.dumps(cfg.to_dict()))
        for freeze in (False, True):
            gc.freeze = real_freeze if freeze else (lambda: None)
            tc = TrainConfig(out=f"{tmp}/run{freeze}", preset=None, model_config=f"{tmp}/m.json", data=str(data),
                             tokenizer="bytes", seq_len=seq, batch_size=4, steps=args.steps, lr=1e-4,
                             warmup_steps=0, schedule="constant", compile="eager" if args.smoke else True,
                             eval_every=0, checkpoint_at_end=False, save_final=False, progress=False)
            tr = Trainer(tc)
            tr.run()
            rates = [h["tokens_per_s"] for h in tr.history[3:-1]]
            hm = len(rates) / sum(1 / r for r in rates)
            print(f"freeze={freeze}: median {statistics.median(rates):,.0f} tok/s, mean (tokens/time) {hm:,.0f}, "
                  f"min {min(rates):,.0f}, rates {[round(r) for r in rates]}", flush=True)
            del tr
    gc.freeze = real_freeze
    return 0


if __name__ == "__main__":
    sys.exit(main())
