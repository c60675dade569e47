"""Copies a prune keeps to put tensors back — the undo copy of a failed prune (``rollback.py``), the dense weights and
the best candidate of a λ/M search (``Pruner._proxy_score``): in host memory when small, in a temporary file when
larger than ``IN_MEMORY_BYTES``, so that a large model is not held two or three times in host memory (the decoder
layers of Llama-3-8B in bf16 are ≈ 13 GiB). The file is ``tempfile``'s (``TMPDIR``), written and read one tensor at a
time, and deleted by ``close_copy`` or when the copy is garbage-collected (a process killed outright leaves its
``mosaic-copy-*`` directory behind)."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Hashable
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

IN_MEMORY_BYTES = 256 << 20  # larger copies go to a temporary file
ROOM = 1 << 30  # left free in the temporary directory beside a copy
BLOCK_BYTES = 64 << 20  # ``read_into`` reads a file copy this many bytes of rows at a time


def copy_tensors(named: dict[Hashable, torch.Tensor], what: str, in_memory_bytes: int | None = None):
    """``{key: copy of tensor}`` (CPU tensors, bit for bit): a dict up to ``in_memory_bytes`` (default
    ``IN_MEMORY_BYTES``) in all, else a ``FileCopy`` where the temporary directory has room for it (else a dict, with a
    warning naming ``what``)."""
    limit = IN_MEMORY_BYTES if in_memory_bytes is None else in_memory_bytes
    nbytes = sum(t.numel() * t.element_size() for t in named.values())
    if nbytes > limit:
        directory = tempfile.gettempdir()
        free = shutil.disk_usage(directory).free
        if free > nbytes + ROOM:
            logger.info(f"writing {what} ({nbytes / 2**30:.2f} GiB) to a temporary file in {directory}")
            try:
                return FileCopy(named, directory)
            except OSError as error:  # not writable, or filled up meanwhile: the file is gone, memory still works
                problem = f"could not be written to {directory} ({error})"
        else:
            problem = f"does not fit in {directory} ({free / 2**30:.1f} GiB free)"
        logger.warning(
            f"{what} ({nbytes / 2**30:.1f} GiB) {problem}: it is kept in host memory (set TMPDIR to a writable "
            "directory with room for it)"
        )
    return {key: t.detach().to("cpu", copy=True) for key, t in named.items()}


def read_into(copy, key, out: torch.Tensor) -> torch.Tensor:
    """``out.copy_(copy[key])`` — into any layout and device — without a whole second copy of the tensor: a file copy
    of a matrix is read ``BLOCK_BYTES`` of rows at a time."""
    if not isinstance(copy, FileCopy) or out.dim() < 2:
        return out.copy_(copy[key])
    offset, dtype, shape = copy.index[key]
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"the copy of {key!r} is {tuple(shape)}, not {tuple(out.shape)}")
    step = max(1, BLOCK_BYTES // max(1, out[0].numel() * out.element_size()))
    block = torch.empty((min(step, shape[0]), *shape[1:]), dtype=dtype)
    with open(copy.path, "rb") as f:
        f.seek(offset)
        for start in range(0, shape[0], step):
            part = block[: min(step, shape[0] - start)]
            copy.read_exactly(f, part)
            out[start : start + len(part)].copy_(part)
    return out


def close_copy(copy) -> None:
    """Delete a ``FileCopy``'s file now (a dict needs nothing)."""
    if isinstance(copy, FileCopy):
        copy.close()


class FileCopy:
    """The bytes of ``named``'s tensors in one temporary file, read back one tensor at a time: ``key in copy`` and
    ``copy[key]`` (a CPU tensor of the tensor's dtype and shape) as for a dict of copies. Writing goes through one
    tensor's bytes at a time (a CUDA tensor is copied to the host first), never a second copy of them all."""

    def __init__(self, named: dict[Hashable, torch.Tensor], directory: str):
        self.directory = Path(tempfile.mkdtemp(prefix="mosaic-copy-", dir=directory))
        self.path = self.directory / "tensors.bin"
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        self.index: dict[Hashable, tuple[int, torch.dtype, torch.Size]] = {}
        offset = 0
        try:
            with open(self.path, "wb") as f:
                for key, t in named.items():
                    host = t.detach().to("cpu").contiguous()
                    f.write(memoryview(host.reshape(-1).view(torch.uint8).numpy()))
                    self.index[key] = (offset, t.dtype, t.shape)
                    offset += host.numel() * host.element_size()
        except BaseException:
            self.close()
            raise

    def __contains__(self, key) -> bool:
        return key in self.index

    def __getitem__(self, key) -> torch.Tensor:
        offset, dtype, shape = self.index[key]
        out = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(offset)
            self.read_exactly(f, out)
        return out

    def read_exactly(self, f, out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor ``out`` with the next bytes of ``f``."""
        view, done = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
        while done < len(view):
            read = f.readinto(view[done:])
            if not read:
                raise OSError(f"{self.path} ends before the copy of a {tuple(out.shape)} tensor")
            done += read

    def close(self) -> None:
        self._finalizer()
