"""RunMetadata: the typed, versioned metadata.json of one load-test run, written once per run.

It says what ran: the run's scenario and seed, the server (`ServerFacts`), the SLOs and search settings,
the endpoint, the load generator's workers and the environment (versions, git commit, host). The JSON
shape is the one tokenrig has always written, plus `schema_version`: the document holds exactly the
fields it was built or loaded with, and settings this model does not name (each backend's options)
are kept as they are.

Files without a version are version 0: their batch limits were recorded only in a launched server's
command line (or, for a `--url` run, as declared), and `read` recovers them from there, so that every
reader sees `server.batch_limits` whatever the file's age.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

from tokenrig.jsonfile import write_json
from tokenrig.serve.backends import BACKENDS
from tokenrig.serve.backends.base import BatchLimits

METADATA_SCHEMA_VERSION = 1


class ReportedServer(BaseModel):
    """What a `--url` server told about itself: the owner of its models, its engine, context and KV cache."""

    model_config = ConfigDict(extra="allow")

    owned_by: str | None = None
    engine: str | None = None
    max_model_len: int | None = None
    kv_cache: dict | None = None  # vLLM's cache_config_info: num_gpu_blocks, block_size, ...


class ServerFacts(BaseModel):
    """metadata.json's `server`. A launched server: its settings as asked (ServerSpec.describe, with each
    backend's options as extra fields), its launch plan (command, env, docker, fit, notes) and what its log
    says it served. A `--url` server: named by what its user declared (`declared` lists which) and what it
    told (`reported`). Both: `batch_limits`, the limits an engine step runs with."""

    model_config = ConfigDict(extra="allow")

    backend: str
    model: str
    gpu: str
    quant: str | None = None
    tp: int | None = None
    max_num_seqs: int | None = None  # as asked (--max-num-seqs); what the engine runs with is in batch_limits
    url: str | None = None  # a --url server's base URL
    served_model: str | None = None
    declared: list[str] | None = None
    reported: ReportedServer | None = None
    batch_limits: BatchLimits | None = None
    command: list[str] | None = None
    env: dict[str, str] | None = None
    docker: list[str] | None = None
    fit: dict | None = None
    notes: list[str] | None = None
    served: dict | None = None

    def document(self) -> dict:
        return self.model_dump(mode="json", exclude_unset=True)


class RunMetadata(BaseModel):
    """One load-test run's metadata.json."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = METADATA_SCHEMA_VERSION
    run_id: str
    created_unix: float
    scenario: dict  # the resolved Scenario as run (validated by whoever runs it again)
    seed: int | None = None  # files written before the seed was recorded apart have it only in the scenario
    seed_source: str | None = None
    server: ServerFacts
    slos: list[str] = []
    search: dict | None = None  # the load profile's settings (load_profiles.profile_from_metadata)
    endpoint: dict | None = None  # base_url, and metrics_url (None: not scraped)
    load_generator_workers: dict | None = None
    versions: dict[str, str] = {}
    git_sha: str | None = None
    host: str | None = None
    platform: str | None = None
    cpu_count: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _read_old_versions(cls, document: dict) -> dict:
        if not isinstance(document, dict) or "schema_version" in document:
            return document
        server = document.get("server")
        if not isinstance(server, dict):
            return {**document, "schema_version": 0}
        return {**document, "schema_version": 0, "server": {**server, "batch_limits": _recorded_limits(server)}}

    @classmethod
    def new(cls, **fields) -> RunMetadata:
        """A run's metadata, of this version."""
        return cls.model_validate({"schema_version": METADATA_SCHEMA_VERSION, **fields})

    def document(self) -> dict:
        return self.model_dump(mode="json", exclude_unset=True)

    def write(self, path: Path) -> None:
        write_json(path, self.document())

    @classmethod
    def read(cls, path: Path) -> RunMetadata:
        return cls.model_validate(json.loads(path.read_text()))


def _recorded_limits(server: dict) -> dict:
    """A version-0 server's batch limits: those recorded as such (what a --url run's user declared), else what
    the backend reads from the command it launched, else the --max-num-seqs asked for."""
    recorded = server.get("batch_limits") or {}
    backend = BACKENDS.get(server.get("backend") or "")
    launched = backend.batch_limits(server["command"]) if backend and server.get("command") else BatchLimits()
    limits = BatchLimits.known(
        max_num_seqs=recorded.get("max_num_seqs") or launched.max_num_seqs or server.get("max_num_seqs"),
        max_batch_tokens=recorded.get("max_batch_tokens") or launched.max_batch_tokens)
    return limits.model_dump(exclude_unset=True)
