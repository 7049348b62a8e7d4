"""conftest.py's test tiers: what makes a test e2e, and the guard that keeps unmarked tests in-process."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO, _runs_this_repository, _starts_processes

# Sample test-suite code, compiled from text: named directly, these helpers would make the tests below e2e too.
SAMPLES_SOURCE = '''
import subprocess
import sys

from tests.conftest import run_cli


def runs_the_cli():
    return run_cli("gpus")


def calls_a_helper_that_runs_the_cli():
    return runs_the_cli()


class Holder:
    def start(self):
        return subprocess.Popen([sys.executable, "-c", "pass"])


def uses_a_class_that_starts_a_process():
    return Holder().start()


def runs_git():
    return subprocess.run(["git", "status"], capture_output=True)


def serves_in_process(engine, tokenizer):
    from tokenrig.serve.api import OpenAIServer

    return OpenAIServer(engine, tokenizer, "tiny", 2048).app()


def stays_in_process():
    return sorted([3, 1, 2])


def starts_tokenrig_unseen():
    start = getattr(subprocess, "Po" + "pen")  # a start no reading of the code finds, as RefServer's
    return start([sys.executable, "-m", "tokenrig.cli", "--help"], stdout=subprocess.DEVNULL)
'''
SAMPLES: dict = {"__name__": __name__}
exec(compile(SAMPLES_SOURCE, __file__, "exec"), SAMPLES)


def _marked(name: str) -> bool:
    function = SAMPLES[name]
    return _starts_processes(function.__code__, function.__globals__, set())


def test_a_test_is_e2e_when_it_or_a_helper_of_the_suite_starts_a_process():
    assert _marked("runs_the_cli") and _marked("calls_a_helper_that_runs_the_cli")
    assert _marked("uses_a_class_that_starts_a_process") and _marked("serves_in_process")
    assert _marked("runs_git")  # any process the test starts itself costs a process start
    assert not _marked("stays_in_process")


@pytest.mark.parametrize("argv, refused", [
    ([sys.executable, "-m", "tokenrig.cli", "gpus"], True),
    ([sys.executable, "-m", "tokenrig.serve.server", "--engine", "sim"], True),
    (["taskset", "-c", "1", sys.executable, str(REPO / "benchmarks" / "refserver.py")], True),
    ([sys.executable, "-c", "import torch"], False),  # a library's own probe, e.g. torch inductor's ISA check
    (["git", "rev-parse", "HEAD"], False),
    ([sys.executable, "/usr/lib/some_tool.py"], False),
])
def test_the_guard_refuses_tokenrig_processes_only(argv, refused):
    assert _runs_this_repository(argv) == refused


def test_an_unmarked_test_that_starts_tokenrig_fails_instead_of_slowing_the_fast_tier():
    with pytest.raises(RuntimeError, match="runs tokenrig in its own process but is not marked e2e"):
        SAMPLES["starts_tokenrig_unseen"]()
