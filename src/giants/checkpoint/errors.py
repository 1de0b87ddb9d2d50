"""The one error class for bad checkpoints: every reader raises it, naming the file and the tensor."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint (or tokenizer file) that cannot be read as asked. Subclass of ValueError so the CLI
    prints it as one line."""

    def __init__(self, message: str, *, file: str | Path | None = None, tensor: str | None = None) -> None:
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        where = []
        if file is not None:
            where.append(str(file))
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class DownloadError(CheckpointError):
    """A known model could not be fetched (offline, package index unreachable, corrupt download)."""
