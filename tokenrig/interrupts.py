"""How tokenrig's long commands are stopped: SIGINT and SIGTERM both act as Ctrl-C.

A process started with `&` from a script inherits SIGINT ignored, and `timeout`, kill, docker and
systemd send SIGTERM. Either way a load test, training run or server must stop the way Ctrl-C
stops it (keeping what it measured, stopping the processes it started), not die or carry on.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def stop_signals_interrupt():
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
