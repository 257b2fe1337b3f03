"""Progress bars, redrawn often on a terminal and seldom elsewhere.

A bar redraws itself in place with a carriage return. On a terminal that stays one line; in a log
file (a batch job's ``> log 2>&1``) every redraw stays, and at one per meta-iteration the paper's
schedule would leave megabytes of them. Where stderr is not a terminal (a log file, a notebook's
``!mamlfast`` cell) a bar is therefore redrawn at most every ``SELDOM`` seconds.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

OFTEN = 0.1  # seconds between redraws on a terminal: tqdm's default
SELDOM = 30.0  # elsewhere


def bar(iterable=None, **options) -> tqdm:
    """``tqdm(iterable, **options)`` redrawn as often as where it is drawn allows."""
    return tqdm(iterable, mininterval=OFTEN if sys.stderr.isatty() else SELDOM, **options)
