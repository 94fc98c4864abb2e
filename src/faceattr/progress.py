"""Progress bars (tqdm) on a terminal; nothing but the usual log lines anywhere else.

Bars show images/s and the time left. They are on only when stderr is a terminal and --quiet was
not given, so logs of batch jobs and CI stay plain lines. While bars are on, log lines are written
through tqdm so that they do not tear a bar apart.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

_ENABLED = {"bars": False}


def configure(bars: bool) -> None:
    _ENABLED["bars"] = bars


def bar(total: int, desc: str) -> tqdm:
    """A progress bar over `total` images; a silent no-op when bars are off."""
    return tqdm(
        total=total,
        desc=desc,
        unit="img",
        unit_scale=True,
        leave=False,
        file=sys.stderr,
        disable=not _ENABLED["bars"],
        dynamic_ncols=True,
    )


class TqdmHandler(logging.StreamHandler):
    """A log handler that prints above the bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never break the command
            self.handleError(record)
