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
