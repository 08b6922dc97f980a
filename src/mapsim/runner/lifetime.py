"""Processes that end with their parent: a run's worker processes and torchrun's ranks.

A forked worker calls :func:`die_with_parent` first. On Linux the kernel then sends it
SIGKILL when the parent ends, however it ends (``PR_SET_PDEATHSIG``, through ``prctl`` from
the C library); everywhere, a daemon thread also checks every half second that the parent is
still the one it started with, and ends the process when it is not. So a run killed with
SIGKILL leaves no worker behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

#: ``prctl`` option: the signal this process gets when its parent ends
PR_SET_PDEATHSIG = 1
#: seconds between the watch thread's checks of the parent
POLL_S = 0.5


def die_with_parent(parent: int | None = None) -> None:
    """End this process when ``parent`` (default: the current parent) ends."""
    parent = os.getppid() if parent is None else parent
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no usable C library: the thread below remains
            pass
    if os.getppid() != parent:  # the parent ended before the call
        os._exit(1)
    watch = threading.Thread(target=_watch, args=(parent,), name="mapsim-parent-watch",
                             daemon=True)
    watch.start()


def _watch(parent: int) -> None:
    while True:
        time.sleep(POLL_S)
        if os.getppid() != parent:
            os._exit(1)
