"""Logging setup shared by the command line and the library."""

from __future__ import annotations

import logging


class _DropKernelsCommunityNotice(logging.Filter):
    """Drops bitsandbytes' import-time notice that the optional `kernels` package (Hub CPU kernels from
    `kernels-community`) is missing. It is harmless: bitsandbytes falls back to its own kernels, and lens-tune does
    not use them. Every other bitsandbytes record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


# The loggers that emit the notice when bitsandbytes is imported (by us, peft or diffusers). A filter on a logger
# sees only that logger's records, so nothing else from bitsandbytes is hidden.
_BNB_NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.backends.mps.ops")


def quiet_bitsandbytes_notice() -> None:
    for name in _BNB_NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKernelsCommunityNotice) for f in logger.filters):
            logger.addFilter(_DropKernelsCommunityNotice())
