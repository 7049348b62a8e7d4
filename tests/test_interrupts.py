"""Stop signals reach the main flow of a gevent-patched load test, whichever greenlet is running."""

import signal
import subprocess
import sys
import textwrap

import pytest

# A "thread" (a greenlet under monkey-patching) receives the signal while it runs: it sends it to itself.
PATCHED_PROCESS = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import os, signal, threading, time
    from tokenrig.interrupts import stop_signals_interrupt

    def scraper():
        os.kill(os.getpid(), signal.{signal})
        for _ in range(200):
            time.sleep(0.01)
        print("scraper still running", flush=True)

    with stop_signals_interrupt():
        try:
            worker = threading.Thread(target=scraper, daemon=True)
            worker.start()
            time.sleep(5)
            print("main never interrupted")
        except KeyboardInterrupt:
            print("main interrupted", flush=True)
            worker.join()
""")


@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_during_a_greenlet_interrupts_the_main_greenlet(stop_signal):
    result = subprocess.run([sys.executable, "-c", PATCHED_PROCESS.format(signal=stop_signal)],
                            capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert result.returncode == 0, result.stdout + result.stderr
    # the signal interrupts the main flow only; the greenlet it arrived in carries on
    assert result.stdout.splitlines() == ["main interrupted", "scraper still running"], result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_stop_signal_without_gevent_raises_keyboardinterrupt():
    script = textwrap.dedent("""
        import os, signal
        from tokenrig.interrupts import stop_signals_interrupt
        with stop_signals_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                print("not interrupted")
            except KeyboardInterrupt:
                print("interrupted")
        print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)  # the inherited handler is back
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert result.stdout.split() == ["interrupted", "True"], result.stdout + result.stderr
