"""The one line tfmem shows when a recipe is applied, without the user configuring logging.

Library code logs, never prints. But a user who calls `recipe.apply(trainer)` should see what it did
(micro-batch, precision, what was frozen and checkpointed) without first turning on logging, and
Python drops INFO records by default. The choice, as transformers makes it for its own messages: the
`tfmem.summary` logger carries only these one-line summaries, at INFO, and has a handler of its own that
writes them to stderr *only while the application has configured no logging* (the root logger has no
handler). Once the application configures logging, its handlers and levels decide, as for any library:
`logging.basicConfig(level=logging.WARNING)` hides the line, INFO shows it once (never twice).
`logging.getLogger("tfmem").setLevel(logging.WARNING)` silences it in either case.

Rejected: `print` (library code must not, and it cannot be silenced); `warnings.warn` (a summary is
not a warning, and warnings show once per call site); returning an object only (a line nobody prints
is not visible).
"""

from __future__ import annotations

import logging
import sys

SUMMARY_LOGGER = "tfmem.summary"


def _unconfigured() -> bool:
    return not logging.getLogger().handlers


def _tfmem_allows(record: logging.LogRecord) -> bool:
    tfmem = logging.getLogger("tfmem")
    if _unconfigured():
        # Only the user's own setting on the `tfmem` logger counts; the root's default WARNING does not.
        return tfmem.level == logging.NOTSET or tfmem.level <= record.levelno
    return tfmem.getEffectiveLevel() <= record.levelno


class _StderrUntilConfigured(logging.Handler):
    """Writes to the current `sys.stderr` (looked up at each record, so redirections see it) while the
    root logger has no handler."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _unconfigured():
            return  # the application's handlers get the record by propagation
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # pragma: no cover - logging must never break training
            self.handleError(record)


def summary_logger() -> logging.Logger:
    """The `tfmem.summary` logger, set up once as the module docstring explains."""
    logger = logging.getLogger(SUMMARY_LOGGER)
    if not any(isinstance(h, _StderrUntilConfigured) for h in logger.handlers):
        handler = _StderrUntilConfigured()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.addFilter(_tfmem_allows)
        logger.setLevel(logging.INFO)  # the filter above applies the levels the user chose
    return logger


def announce(line: str) -> None:
    """Log `line` at INFO on `tfmem.summary`: shown on stderr until the application configures logging."""
    summary_logger().info(line)
