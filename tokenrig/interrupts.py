"""How tokenrig's long commands are stopped: SIGINT and SIGTERM both act as Ctrl-C.

A process started with `&` from a script inherits SIGINT ignored, and `timeout`, kill, docker and
systemd send SIGTERM. Either way a load test, training run or server must stop the way Ctrl-C
stops it (keeping what it measured, stopping the processes it started), not die or carry on.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _gevent_patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("threading")


def _interrupt_main_greenlet() -> None:
    import gevent

    hub = gevent.get_hub()
    hub.loop.run_callback(hub.parent.throw, KeyboardInterrupt)  # what the hub does with a greenlet's own


@contextmanager
def stop_signals_interrupt():
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread.

    Under Locust's monkey-patching the "main thread" runs many greenlets, and a Python signal handler
    raises in whichever one is current: a scraper "thread" would swallow it (threading prints and
    drops a thread's exceptions) and the run would carry on. gevent's own signal watchers run the
    handler in a greenlet of its own, which has the hub raise KeyboardInterrupt in the main greenlet."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    watchers = []
    if _gevent_patched():
        import gevent

        watchers = [gevent.signal_handler(sig, _interrupt_main_greenlet) for sig in STOP_SIGNALS]
    else:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.default_int_handler)
    try:
        yield
    finally:
        for watcher in watchers:
            watcher.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
