import pytest
import requests

from tests.conftest import start_server
from tokenrig.serve.backends import launch_plan
from tokenrig.serve.launcher import LaunchError


def test_server_that_dies_reports_its_log(tmp_path_factory):
    server = start_server(tmp_path_factory, "sim", extra_args=["--no-such-flag"])
    with pytest.raises(LaunchError, match="unrecognized arguments: --no-such-flag"):
        with server:
            pass
    assert server.process.poll() is not None


def test_stop_ends_the_process_and_frees_the_port(tmp_path_factory):
    with start_server(tmp_path_factory, "sim", sim_ttft_ms=1, sim_tpot_ms=1) as server:
        base = server.endpoint.base_url
        assert requests.get(f"{base}/health", timeout=5).status_code == 200
    assert server.process.returncode is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/health", timeout=2)
    assert "tokenrig sim server" in server.log_path.read_text()


def test_unknown_backend_is_refused(tmp_path_factory):
    server = start_server(tmp_path_factory, "sim")
    server.spec.backend = "trt"
    with pytest.raises(LaunchError, match="known backends: hf, sim, vllm, tgi"):
        launch_plan(server.spec, tmp_path_factory.mktemp("m"), 1)
