"""What the worker tells the supervisor outside the protocol channel: its log
lines on stderr (the supervisor forwards them to its own log and keeps a tail
for crash reports) and its exit status (a group of ranks adds its own:
ranks.py). Its own module so that every other one can log without importing
worker.py.
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_LOAD = 1
EXIT_NO_MODEL = 2
EXIT_PROTOCOL = 3


def log(*args) -> None:
    print("krserve_worker:", *args, file=sys.stderr, flush=True)
