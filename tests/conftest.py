from __future__ import annotations

import os

import pytest
import torch

# The suite never reaches the hub (transformers and `kernels` would otherwise try to, e.g. for MXFP4 kernels):
# forced, not defaulted, and set before anything imports huggingface_hub (it reads the variable at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

HF_TINY = ("tiny-llama", "tiny-gemma2", "tiny-mixtral", "tiny-gpt-oss")
ALL_TINY = (*HF_TINY, "tiny-gpt-oss-described")

# For tests that need a CUDA GPU (`from conftest import cuda`, then `@cuda`). `make test-gpu` runs them.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects
def pytest_collection_modifyitems(config, items):
    """Mark `cuda` every test of a test_cuda_*.py file and every test that skips without CUDA (the `cuda` marker
    above, or its own skipif whose reason names CUDA), so that `pytest -m cuda` selects exactly the GPU tests."""
    for item in items:
        if item.path.name.startswith("test_cuda_") or any(
                "cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)


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


@pytest.fixture(scope="session")
def smollm2_transformers():
    """transformers' model loaded from SmolLM2-135M's GGUF (fp32, its default attention), for the tests that compare
    with it: the load parses and dequantizes the file (over ten seconds), so it happens once a session. A test that
    needs it otherwise (another attention implementation) takes a copy."""
    import transformers

    from giants.checkpoint import download

    path = download("smollm2-135m")
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_server():
    """One real `giants serve smollm2-135m` process (loopback) for the structured-output and tool-call tests, and the
    official openai client on it; it must stop cleanly (exit 0) at the end."""
    import openai

    from giants.checkpoint import hub
    from giants.serve.launch import ServerProcess

    hub.download("smollm2-135m")
    with ServerProcess("smollm2-135m", "--max-model-len", "1024", "--log-level", "warning") as srv:
        yield openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=300)
        assert srv.stop() == 0
