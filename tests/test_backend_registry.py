"""The backend registry: one plug-in object per engine, and what reads it (--backend's choices, the options a spec
takes, the scraper's names, the default client, the versions a run records)."""

import argparse
import dataclasses

from tokenrig.cli.parser import build_parser
from tokenrig.report.rundir import environment_facts
from tokenrig.serve import scrape
from tokenrig.serve.backends import BACKENDS, metric_names
from tokenrig.serve.spec import ServerSpec

SERVER_COMMANDS = ("serve", "loadtest", "capacity")


def _backend_choices(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    """--backend's choices on each server command of the CLI."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: tuple(next(a for a in commands[name]._actions if "--backend" in a.option_strings).choices)
            for name in SERVER_COMMANDS}


def test_backend_choices_are_the_registrys():
    assert list(BACKENDS) == ["hf", "sim", "vllm", "sglang", "tgi"]
    assert _backend_choices(build_parser()) == {name: tuple(BACKENDS) for name in SERVER_COMMANDS}


def test_a_registered_backend_is_offered_and_takes_its_options(monkeypatch):
    """Adding an engine is one registry entry: the CLI offers it and a spec takes its options class."""
    monkeypatch.setitem(BACKENDS, "sglang-next", dataclasses.replace(BACKENDS["sglang"], name="sglang-next"))
    assert all("sglang-next" in choices for choices in _backend_choices(build_parser()).values())
    args = build_parser().parse_args(["serve", "--backend", "sglang-next", "--gpu", "h100-sxm", "--model", "7b",
                                      "--no-prefix-caching"])
    assert ServerSpec.from_args(args).options == BACKENDS["sglang"].options(prefix_caching=False)


def test_the_scraper_reads_every_engines_names_for_its_figures():
    for figure, names in {**scrape.GAUGES, **scrape.COUNTERS}.items():
        assert names == metric_names(figure)
        for backend in BACKENDS.values():
            assert set(backend.metrics.get(figure, ())) <= set(names)
    assert scrape.GAUGES["running"] == (
        "vllm:num_requests_running", "sglang:num_running_reqs", "tgi_batch_current_size")


def test_default_clients_and_recorded_engine_versions_come_from_the_registry():
    assert {name: backend.default_client for name, backend in BACKENDS.items()} == {
        "hf": "openai", "sim": "openai", "vllm": "openai", "sglang": "openai", "tgi": "tgi"}
    packages = {backend.package for backend in BACKENDS.values() if backend.package}
    assert {"vllm", "sglang", "transformers"} <= packages
    versions = environment_facts()["versions"]
    assert "transformers" in versions and "vllm" not in versions and "sglang" not in versions  # not installed here
