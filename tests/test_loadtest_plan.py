"""The LoadTestPlan a `loadtest` command line builds, before anything starts: every option checked, the scenario
carrying the command line's load, and a GPU server's fit planned once, which its launch then takes."""

import sys

import pytest

from tests.test_backends import MODEL_DIR
from tokenrig.cli.parser import build_parser, given_options
from tokenrig.cli.serving import loadtest_plan
from tokenrig.errors import UsageError
from tokenrig.loadgen.load_profiles import FindMax
from tokenrig.serve import backends
from tokenrig.serve.backends import base


def parse(*options: str):
    argv = ["loadtest", "--scenario", "chat", "--duration", "30", *options]
    args = build_parser().parse_args(argv)
    args.given = given_options(argv)
    return args


@pytest.fixture
def fit_plans(monkeypatch) -> list:
    """Every fit the backends plan, counted (each call goes on to the real planner)."""
    calls = []

    def planned(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    real = base.plan_fit
    monkeypatch.setattr(base, "plan_fit", planned)
    return calls


def test_a_gpu_servers_fit_is_planned_once_and_launched_with(fit_plans):
    plan = loadtest_plan(parse("--backend", "vllm", "--gpu", "h100-sxm", "--model", "7b", "--users", "8"))
    assert len(fit_plans) == 1 and plan.fit.tp == 1 and plan.fit.concurrency == 8
    launch = backends.launch_plan(plan.spec, MODEL_DIR, 8000, plan.fit)
    assert len(fit_plans) == 1 and launch.fit is plan.fit
    assert launch.command == backends.launch_plan(plan.spec, MODEL_DIR, 8000).command  # as planning it again
    assert "locust" not in sys.modules  # building the plan starts nothing of the load generator


def test_the_plan_carries_the_command_lines_load_profile_and_options(fit_plans):
    plan = loadtest_plan(parse("--backend", "sim", "--gpu", "a800", "--model", "7b", "--rate", "4", "--find-max",
                               "--slo", "ttft_p99=500ms", "--seed", "7", "--no-scrape", "--request-timeout", "30"))
    assert not fit_plans and plan.fit is None  # a simulated server plans its own at launch
    assert (plan.scenario.load.type, plan.scenario.load.rate, plan.scenario.load.seed) == ("poisson", 4.0, 7)
    assert isinstance(plan.profile, FindMax) and plan.profile.start_rate == 4.0 and plan.seed_source == "--seed"
    assert [slo.name for slo in plan.slos] == ["ttft_p99"] and plan.client == "openai"
    assert (plan.scrape, plan.request_timeout_s, plan.remote, plan.workers) == (False, 30.0, None, None)


def test_a_url_run_plans_no_fit_and_records_what_its_user_declared(fit_plans):
    plan = loadtest_plan(parse("--url", "http://127.0.0.1:9", "--model", "7b", "--users", "2"))
    assert not fit_plans and plan.fit is None
    assert plan.remote.url == "http://127.0.0.1:9" and plan.remote.declared == {"model": "llama2-7b"}


def test_local_workers_beyond_the_workers_are_refused_as_usage():
    with pytest.raises(UsageError, match="--local-workers must be between 0 and --workers"):
        loadtest_plan(parse("--backend", "sim", "--users", "2", "--workers", "2", "--local-workers", "3"))
