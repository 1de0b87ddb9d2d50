from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

HF_TINY = ("tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss")
ALL_TINY = (*HF_TINY, "tiny-gpt-oss-described")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory):
    """A small byte-level dataset (no tokenizer download) for the training mechanics tests."""
    from giants.train.data import prepare

    root = tmp_path_factory.mktemp("bytes")
    (root / "text.txt").write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n"
                                           for i in range(400)))
    prepare(root / "text.txt", "bytes", root / "ds", val_fraction=0.1)
    return root / "ds"
