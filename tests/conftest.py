"""Shared fixtures: real servers on loopback ports, started and stopped by the tests; and the test tiers.

A test that starts a process (a server, the CLI, a benchmark script), or tokenrig's HTTP server inside the
test's process, is marked `e2e` here, at collection, from what its code and its fixtures call; `make
test-fast` runs the rest but the few marked `slow` (`-m "not e2e and not slow"`). While an unmarked test
runs, starting tokenrig in a process of its own fails it, so the tiers cannot drift apart. `make test` runs
the tests two at a time (pytest-xdist), then those marked `timing` alone: they judge latencies or send times
against a schedule, which another test's load on the same two cores would move.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

from tokenrig.loadgen.ceiling import CEILING_FILE_ENV, this_machine
from tokenrig.profiles import resolve_gpu, resolve_model
from tokenrig.serve.launcher import LaunchedServer
from tokenrig.serve.spec import ServerSpec

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
VLLM_0_26_PAGE = Path(__file__).resolve().parent / "fixtures" / "vllm-0.26.0-metrics.txt"
# built from SGLang 0.5.17's metric definitions, not captured
# (its header says how: scripts/make_sglang_metrics_fixture.py)
SGLANG_0_5_17_PAGE = Path(__file__).resolve().parent / "fixtures" / "sglang-0.5.17-metrics-under-load.txt"


@pytest.fixture(scope="session", autouse=True)
def _per_session_state(tmp_path_factory):
    """Checkpoints go to one per-session cache unless the user points TOKENRIG_MODELS elsewhere; the load
    generator's ceiling is the shipped one."""
    if "TOKENRIG_MODELS" not in os.environ:
        os.environ["TOKENRIG_MODELS"] = str(tmp_path_factory.mktemp("models"))
    # the shipped load-generator ceiling, whatever `make bench-loadgen` saved on this machine (tests that need a
    # measured one point this elsewhere)
    os.environ[CEILING_FILE_ENV] = str(tmp_path_factory.mktemp("ceiling") / "none.json")
    # DeepSpeed compiles its CPU communication op on a training run's first use (1-2 min on 2 cores) into one
    # directory per op name, shared by every virtualenv on the machine; a build by another venv, or by another
    # ninja (the venv's 1.13 and Debian's 1.11 hash the same command line differently), makes the next run rebuild
    # it. The tests keep the build of this venv and of the ninja on their PATH.
    ninja = hashlib.sha1(str(shutil.which("ninja")).encode()).hexdigest()[:8]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch-extensions" / f"ninja-{ninja}"))
    # One thread per torch process: the suite runs two tests at a time on two cores, each with a server, the CLI or
    # two DeepSpeed ranks, where torch's default of a thread per core has each process's OpenMP threads wait on
    # each other's time slices (the tiny models here gain nothing from a second thread)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield


@functools.cache
def instant_server_env() -> dict[str, str]:
    """For a run against a scripted loopback server that answers at once (tests of faults and accounting, not of
    timing): a ceiling kept for this machine that such a server's chunk rate stays under, so that the run is
    judged on everything else and exits 0, not 4 (past the shipped ceiling a 2-user closed loop of it streams
    ~20,000 chunks/s: INVALID)."""
    path = Path(tempfile.mkdtemp(prefix="tokenrig-test-ceiling-")) / "ceiling.json"
    path.write_text(json.dumps({"chunks_per_s": 10**9, "machine": this_machine(),
                                "measured": "tests against an instant loopback server, whose latencies none judges"}))
    return {CEILING_FILE_ENV: str(path)}


def start_server(tmp_path_factory, backend: str, model: str = "tiny", gpu: str = "cpu", **kwargs) -> LaunchedServer:
    spec = ServerSpec(backend=backend, model=resolve_model(model), gpu=resolve_gpu(gpu), **kwargs)
    log = tmp_path_factory.mktemp(f"{backend}-server") / "server.log"
    return LaunchedServer(spec, log, health_timeout_s=300, progress=lambda *_: None)


@pytest.fixture(scope="session")
def hf_server(tmp_path_factory):
    with start_server(tmp_path_factory, "hf") as server:
        yield server


@pytest.fixture(scope="session")
def sim_server(tmp_path_factory):
    with start_server(tmp_path_factory, "sim", model="llama2-7b", gpu="h100-sxm") as server:
        yield server


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `tokenrig ...` as a user would, in its own process (Locust patches the interpreter); `env` adds to
    this process's environment. On a timeout, or when the test is stopped, its whole process group goes: killing
    the CLI alone left DeepSpeed's launcher and ranks (or a server it started) loading the tests after it."""
    with subprocess.Popen([sys.executable, "-m", "tokenrig.cli", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=cwd or REPO, env={**os.environ, **(env or {})},
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def without_torch(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import torch` fails, in the CLI and every process it starts: the sim and
    vLLM paths must not pay torch's import (~4 s and a heap the load generator then freezes)."""
    package = tmp_path / "no-torch" / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('torch was imported on a path that needs no torch')\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(package.parent), os.environ.get("PYTHONPATH")]))}


def run_dir_of(result: subprocess.CompletedProcess) -> Path:
    for line in result.stdout.splitlines():
        if line.startswith("results: "):
            return Path(line.split("results: ", 1)[1].strip())
    raise AssertionError(f"no results line in output:\n{result.stdout}\n{result.stderr}")


def load_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# The sim engine's roofline as the capacity and report tests set it: not RooflineParams' defaults, so a
# calibration that recovers it has learnt it from the runs.
KNOWN_ROOFLINE = {"compute_efficiency": 0.35, "bandwidth_efficiency": 0.45, "step_overhead_ms": 4.0}


@pytest.fixture(scope="session")
def known_engine_runs(tmp_path_factory):
    """Real sim-server load tests of llama2-7b with KNOWN_ROOFLINE: closed-loop sweeps (1 and 8 users) on
    an RTX 3090 and an H200 profile, whose bandwidths differ 5x (so bandwidth and per-step overhead
    separate) and whose compute differs 14x (so a 600-token prefill takes 320 against 23 ms, and host
    latency in TTFT cannot pass for compute), and a --find-max search on an A800 profile, a GPU the
    sweeps never ran on."""
    results = tmp_path_factory.mktemp("known-engine")
    # --seed 0: the runs these tolerances were measured on (a run otherwise draws a fresh seed)
    common = ["--backend", "sim", "--model", "7b", "--scenario", str(DATA / "capacity.yaml"), "--seed", "0",
              "--sim-compute-efficiency", str(KNOWN_ROOFLINE["compute_efficiency"]),
              "--sim-bandwidth-efficiency", str(KNOWN_ROOFLINE["bandwidth_efficiency"]),
              "--sim-step-overhead-ms", str(KNOWN_ROOFLINE["step_overhead_ms"])]
    runs = {}
    for name, args in (("rtx3090", ["--gpu", "rtx3090", "--users", "sweep", "--sweep", "1,8", "--duration", "6"]),
                       ("h200", ["--gpu", "h200", "--users", "sweep", "--sweep", "1,8", "--duration", "6"]),
                       ("a800", ["--gpu", "a800", "--find-max", "--rate", "2", "--slo", "ttft_p90=300ms",
                                 "--tail-samples", "2", "--max-step", "6", "--precision", "0.25"])):
        result = run_cli("loadtest", *common, *args, "--results", str(results / name), timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = run_dir_of(result)
    return runs


@pytest.fixture(scope="session")
def known_engine_capacity(known_engine_runs, tmp_path_factory):
    """`tokenrig capacity` answered once from the known-engine runs, for the tests that read its answer: the A800
    measured (its search), an L40S and the H200 projected from the engine's calibration, 20 req/s asked for, the
    L40S at $1.00/h. Its SLO is not the 300 ms the A800 search ran for: the steps are judged again from their
    records; looser, so that the search's best full step (its probes are first looks, never answers) surely meets it."""
    directory = tmp_path_factory.mktemp("known-engine-capacity")
    answer = types.SimpleNamespace(slo="ttft_p90=350ms", json=directory / "capacity.json",
                                   csv=directory / "capacity.csv")
    answer.result = run_cli("capacity", "--from", *map(str, known_engine_runs.values()), "--gpu", "a800,l40s,h200",
                            "--model", "7b", "--scenario", str(DATA / "capacity.yaml"), "--slo", answer.slo,
                            "--target-rps", "20", "--price", "l40s=1.00", "--out", str(answer.json), "--csv",
                            str(answer.csv), timeout=600)
    return answer


# What starts a process or a server when a test calls it: these helpers and classes (OpenAIServer: tokenrig's
# HTTP server, in the test's process), subprocess's functions, and a fixture looked up by name at run time
# (request.getfixturevalue), which may be a server.
PROCESS_STARTERS = {"run_cli", "start_server", "LaunchedServer", "OpenAIServer", "Popen", "getfixturevalue"}
SUBPROCESS_CALLS = {"run", "call", "check_call", "check_output", "Popen"}
TESTS = Path(__file__).resolve().parent


def _defined_in_tests(value) -> bool:
    module = sys.modules.get(getattr(value, "__module__", None) or "")
    return Path(getattr(module, "__file__", None) or "/").resolve().is_relative_to(TESTS)


def _starts_processes(code: types.CodeType, namespace: dict, seen: set) -> bool:
    """Whether this code, or a function or class of the test suite it names, calls a PROCESS_STARTER."""
    if code in seen:
        return False
    seen.add(code)
    names = set(code.co_names)
    if names & PROCESS_STARTERS or ("subprocess" in names and namespace.get("subprocess") is subprocess
                                    and names & SUBPROCESS_CALLS):
        return True
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and _starts_processes(const, namespace, seen):
            return True
    for name in names:
        value = namespace.get(name)
        if not _defined_in_tests(value):
            continue  # tokenrig's own code runs in the test's process unless a starter above is called
        for member in vars(value).values() if inspect.isclass(value) else [value]:
            function = inspect.unwrap(getattr(member, "__func__", member))
            if inspect.isfunction(function) and _starts_processes(function.__code__, function.__globals__, seen):
                return True
    return False


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        functions = [item.function] if isinstance(item, pytest.Function) else []
        for definitions in item._fixtureinfo.name2fixturedefs.values():
            functions += [inspect.unwrap(d.func) for d in definitions if _defined_in_tests(d.func)]
        seen: set = set()
        if any(_starts_processes(f.__code__, f.__globals__, seen) for f in functions):
            item.add_marker(pytest.mark.e2e)
        if "known_engine_runs" in item.fixturenames:  # its sweeps and search judge the load generator's timing
            item.add_marker(pytest.mark.timing)
    # The files with the most process-starting tests first: `make test` hands each file whole to one of its two
    # workers (--dist loadfile), in this order, so the long files start early and the short ones fill in at the end
    # (in name order the training runs' file, minutes of DeepSpeed launches, started near the end and ran alone)
    starts = collections.Counter(item.path for item in items if item.get_closest_marker("e2e"))
    items.sort(key=lambda item: -starts[item.path])  # stable: each file's tests keep their order


_running_unit_test: list[str] = []  # the node id of the test running now, when it is not e2e


def _runs_this_repository(argv: list[str]) -> bool:
    """`python -m tokenrig...` or `python <a file of this repository>`, also behind a wrapper such as taskset
    (other Python processes are libraries' own business, e.g. torch probing the CPU)."""
    for index, arg in enumerate(argv[:-1]):
        if arg == sys.executable:
            following = argv[index + 1:index + 3]
            if following[0] == "-m":
                return len(following) > 1 and following[1].startswith("tokenrig")
            return following[0].endswith(".py") and (REPO / following[0]).resolve().is_relative_to(REPO)
    return False


def _refuse_tokenrig_processes(event: str, args: tuple) -> None:
    if event == "subprocess.Popen" and _running_unit_test and _runs_this_repository([str(a) for a in args[1]]):
        raise RuntimeError(f"{_running_unit_test[0]} runs tokenrig in its own process but is not marked e2e: call "
                           f"it through run_cli/start_server/subprocess (tests/conftest.py marks those) or mark it "
                           f"@pytest.mark.e2e")


def pytest_configure(config):
    sys.addaudithook(_refuse_tokenrig_processes)  # here, not at import: tests import this module a second time


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("e2e") is None:
        _running_unit_test.append(item.nodeid)
    try:
        return (yield)
    finally:
        _running_unit_test.clear()
