import signal
import subprocess
import sys

import pytest
import requests

from tests.conftest import start_server
from tokenrig.serve.launcher import free_port
from tokenrig.serve.spec import LaunchError, SimOptions

FIXED = SimOptions(sim_ttft_ms=1, sim_tpot_ms=1)


def test_server_that_dies_reports_its_log(tmp_path_factory):
    server = start_server(tmp_path_factory, "sim", extra_args=["--no-such-flag"])
    with pytest.raises(LaunchError, match="unrecognized arguments: --no-such-flag"):
        with server:
            pass
    assert server.process.poll() is not None


def test_stop_ends_the_process_and_frees_the_port(tmp_path_factory):
    with start_server(tmp_path_factory, "sim", options=FIXED) as server:
        base = server.endpoint.base_url
        assert requests.get(f"{base}/health", timeout=5).status_code == 200
    assert server.process.returncode is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/health", timeout=2)
    assert "tokenrig sim server" in server.log_path.read_text()


def test_unknown_backend_is_refused(tmp_path_factory):
    with pytest.raises(LaunchError, match="known backends: hf, sim, vllm, sglang, tgi"):
        start_server(tmp_path_factory, "trt")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_tokenrig_serve_stops_its_server_on_sigterm_and_on_sigint_even_when_started_in_the_background(
        tmp_path, stop_signal):
    """`tokenrig serve ... &` in a script inherits SIGINT ignored; kill/systemd send SIGTERM: both must stop it."""
    port = free_port()
    cli = subprocess.Popen(
        [sys.executable, "-m", "tokenrig.cli", "serve", "--backend", "sim", "--sim-ttft-ms", "1", "--sim-tpot-ms", "1",
         "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines = []
    while not any(line.startswith("serving tiny") for line in lines):  # healthy, and the launcher said so
        lines.append(cli.stdout.readline())
        assert lines[-1], "".join(lines)
    assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    cli.send_signal(stop_signal)
    output, _ = cli.communicate(timeout=60)
    assert cli.returncode == 0 and "stopping server" in output, "".join(lines) + output
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_a_server_does_not_outlive_a_killed_tokenrig(tmp_path):
    """SIGKILL gives tokenrig no chance to stop its server: the kernel must (a GPU server would keep its memory)."""
    import time

    port = free_port()
    cli = subprocess.Popen(
        [sys.executable, "-m", "tokenrig.cli", "serve", "--backend", "sim", "--sim-ttft-ms", "1", "--sim-tpot-ms", "1",
         "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while not any(line.startswith("serving tiny") for line in lines):
        lines.append(cli.stdout.readline())
        assert lines[-1], "".join(lines)
    assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    cli.kill()
    cli.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
        except requests.ConnectionError:
            return
        time.sleep(0.2)
    pytest.fail("the server still answers 15 s after tokenrig was killed")
