"""Undo a failed prune: ``Pruner.prune`` runs under ``restore_on_error(model)``, so an exception leaves the model
exactly as it was (weights, modules replaced by structured removal, attention bookkeeping, config, class).

What is kept while the prune runs: a copy of every parameter and buffer of the decoder layers (the tensors a
prune changes in place), and shallow copies of every module's attributes and child/parameter/hook tables
(structured removal swaps modules and changes counters; the originals are never modified in place, only
unlinked). Outside the decoder layers only the device of each tensor is recorded. The copy of the layers is
written to a temporary file (``tempfile``'s directory: ``TMPDIR``) when it is larger than ``IN_MEMORY_BYTES``, so a
large model is not held twice in host memory; smaller copies, and copies the temporary directory has no room
for (with a warning), stay in host memory. The file is deleted when the prune ends, failed or not.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging

from .architectures import decoder_layers, get_arch_spec

logger = logging.get_logger(__name__)

IN_MEMORY_BYTES = 256 << 20  # larger copies of the decoder layers go to a temporary file


class ModelSnapshot:
    def __init__(self, model, in_memory_bytes: int | None = None):
        self.model, self.cls = model, type(model)
        self.config, self.config_state = model.config, copy.deepcopy(model.config.__dict__)
        self.modules = [(m, self._tables(m)) for m in model.modules()]
        layers = decoder_layers(model, get_arch_spec(model))
        self.values = _copy_of(_tensors(layers), in_memory_bytes)
        self.tensors = [(t, t.device, t.data) for t in _tensors(model)]

    @staticmethod
    def _tables(module) -> tuple[dict, dict]:
        attrs = dict(module.__dict__)
        return attrs, {k: dict(v) for k, v in attrs.items() if isinstance(v, dict)}

    @torch.no_grad()
    def restore(self) -> None:
        model = self.model
        model.__class__ = self.cls
        for module, (attrs, tables) in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for key, table in tables.items():
                attrs[key].clear()
                attrs[key].update(table)
        model.config = self.config
        self.config.__dict__.clear()
        self.config.__dict__.update(self.config_state)
        for tensor, device, data in self.tensors:
            tensor.data = data if data.device == device else data.to(device)
            if id(tensor) in self.values:
                tensor.data.copy_(self.values[id(tensor)])

    def close(self) -> None:
        """Drop the copy (delete its file)."""
        if isinstance(self.values, FileCopy):
            self.values.close()
        self.values = {}


def _tensors(module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _copy_of(tensors: list[torch.Tensor], in_memory_bytes: int | None):
    """``{id(t): copy of t}`` for ``tensors``: in host memory up to ``in_memory_bytes`` (default
    ``IN_MEMORY_BYTES``), else a ``FileCopy`` where the temporary directory has room for it."""
    limit = IN_MEMORY_BYTES if in_memory_bytes is None else in_memory_bytes
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if nbytes > limit:
        directory = tempfile.gettempdir()
        free = shutil.disk_usage(directory).free
        if free > nbytes + (1 << 30):
            return FileCopy(tensors, directory)
        logger.warning(
            f"the rollback copy of the decoder layers ({nbytes / 2**30:.1f} GiB) does not fit in {directory} "
            f"({free / 2**30:.1f} GiB free): it is kept in host memory (set TMPDIR, or prune(restore_on_error=False))"
        )
    return {id(t): t.detach().to("cpu", copy=True) for t in tensors}


class FileCopy:
    """The bytes of ``tensors`` in one temporary file, read back one tensor at a time: ``id(t) in copy`` and
    ``copy[id(t)]`` (a CPU tensor of ``t``'s dtype and shape) as for a dict of copies. Writing goes through one
    tensor's bytes at a time (a CUDA tensor is copied to the host first), never a second copy of them all."""

    def __init__(self, tensors: list[torch.Tensor], directory: str):
        self.directory = Path(tempfile.mkdtemp(prefix="mosaic-rollback-", dir=directory))
        self.path = self.directory / "layers.bin"
        self.index: dict[int, tuple[int, torch.dtype, torch.Size]] = {}
        offset = 0
        try:
            with open(self.path, "wb") as f:
                for t in tensors:
                    if id(t) in self.index:
                        continue
                    host = t.detach().to("cpu").contiguous()
                    f.write(memoryview(host.reshape(-1).view(torch.uint8).numpy()))
                    self.index[id(t)] = (offset, t.dtype, t.shape)
                    offset += host.numel() * host.element_size()
        except BaseException:
            self.close()
            raise

    def __contains__(self, key: int) -> bool:
        return key in self.index

    def __getitem__(self, key: int) -> torch.Tensor:
        offset, dtype, shape = self.index[key]
        out = torch.empty(shape, dtype=dtype)
        view, done = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
        with open(self.path, "rb") as f:
            f.seek(offset)
            while done < len(view):
                read = f.readinto(view[done:])
                if not read:
                    raise OSError(f"{self.path} ends before the copy of a {tuple(shape)} tensor")
                done += read
        return out

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def restore_on_error(model, enabled: bool = True):
    """Run the block; on an exception put ``model`` back as it was, then re-raise."""
    if not enabled:
        yield
        return
    snapshot = ModelSnapshot(model)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
    finally:
        snapshot.close()
