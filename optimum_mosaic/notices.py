"""Expected bitsandbytes log notices on CPU, filtered out (kept torch-free: ``import optimum_mosaic`` installs it)."""

from __future__ import annotations

import logging

_NOISE = ("Failed to load CPU gemm_4bit_forward", "MatMul8bitLt: inputs will be cast")


class _DropBnbNoise(logging.Filter):
    """bitsandbytes logs, on CPU, that an optional Hub kernel is missing (a slower built-in path is used)
    and, on every 8-bit forward, that fp32 inputs are cast to fp16. Both are expected; drop only those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE)


def silence_bnb_cpu_notices() -> None:
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropBnbNoise) for f in log.filters):
            log.addFilter(_DropBnbNoise())
