"""Undo a failed prune: ``Pruner.prune`` runs under ``restore_on_error(model)``, so an exception leaves the model
exactly as it was (weights, modules replaced by structured removal, attention bookkeeping, config, class).

What is kept while the prune runs: a copy of every parameter and buffer of the decoder layers (the tensors a
prune changes in place), and shallow copies of every module's attributes and child/parameter/hook tables
(structured removal swaps modules and changes counters; the originals are never modified in place, only
unlinked). Outside the decoder layers only the device of each tensor is recorded. The copy of the layers is
written to a temporary file (``TMPDIR``) when it is larger than ``copies.IN_MEMORY_BYTES`` (256 MiB), so a large
model is not held twice in host memory; smaller copies, and copies the temporary directory has no room for (with a
warning), stay in host memory. The file is deleted when the prune ends, failed or not.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .architectures import decoder_layers, get_arch_spec
from .copies import close_copy, copy_tensors


class ModelSnapshot:
    def __init__(self, model, in_memory_bytes: int | None = None):
        self.model, self.cls = model, type(model)
        self.config, self.config_state = model.config, copy.deepcopy(model.config.__dict__)
        self.modules = [(m, self._tables(m)) for m in model.modules()]
        layers = decoder_layers(model, get_arch_spec(model))
        named = {id(t): t for t in _tensors(layers)}
        self.values = copy_tensors(named, "the rollback copy of the decoder layers", in_memory_bytes)
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
        close_copy(self.values)
        self.values = {}


def _tensors(module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


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
