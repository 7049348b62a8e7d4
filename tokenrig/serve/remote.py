"""A server tokenrig did not start (`loadtest --url`): the URL made whole, the model it serves, its API
key, the tokenizer prompt lengths are counted with (a local file, or a Hugging Face Hub model's), a
pre-flight request that stops the run before any load with one line naming the fix (server down, wrong
key, model not served, no event stream), and what the run records of it: what the user declared
(--backend, --gpu, --model, --quant, --tp, --max-num-seqs) and what the server tells (its engine,
context, KV cache), so that capacity planning can place the run as it places a server tokenrig started.

The API key only ever travels in request headers: nothing here writes it to metadata or logs.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from tokenrig.errors import UserError
from tokenrig.serve.backends.base import BatchLimits
from tokenrig.serve.scrape import parse_metrics

STREAM_TYPE = "text/event-stream"
# the engine a server names as the owner of its models (/v1/models `owned_by`), else the prefix of its
# /metrics names; tokenrig's own server runs the hf or the sim engine, which it does not tell apart
OWNERS = {"vllm": "vllm", "sglang": "sglang", "tokenrig": "tokenrig"}
METRIC_PREFIXES = (("vllm:", "vllm"), ("sglang:", "sglang"), ("tgi_", "tgi"))
# what a --url run's user may declare about the server, as ServerSpec.describe() names it
DECLARABLE = ("backend", "gpu", "model", "quant", "tp", "max_num_seqs")
# vLLM's cache_config_info labels a run keeps: KV blocks, tokens per block, KV tokens, memory fraction
CACHE_CONFIG_LABELS = {"num_gpu_blocks": int, "block_size": int, "kv_cache_size_tokens": int,
                       "gpu_memory_utilization": float}


class RemoteError(UserError):
    """The remote server cannot be load-tested as asked; the message names the fix."""


def whole_url(url: str) -> str:
    """The base URL with its scheme (http:// when none is given), without a trailing / or /v1."""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteError(f"--url {url!r}: give http(s)://HOST[:PORT], e.g. http://127.0.0.1:8000")
    return url.rstrip("/").removesuffix("/v1")


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


@dataclass
class RemoteOptions:
    """What `loadtest --url` was given: the URL as typed, the key, the served model name, a tokenizer path, and
    what the user declared about the server (a DECLARABLE name -> its value as ServerSpec.describe() has it)."""

    url: str
    api_key: str | None = None
    served_model: str | None = None
    tokenizer: Path | None = None  # the directory of the tokenizer --tokenizer names (tokenizer_dir)
    declared: dict = field(default_factory=dict)


@dataclass
class ServerReport:
    """What a running server tells about itself: the owner of its models, the engine that implies (or its
    /metrics names do), its context, and vLLM's KV-cache configuration (cache_config_info); and, not recorded,
    why its /metrics page is no page to scrape (an HTTP error, or not Prometheus' format)."""

    owned_by: str | None = None
    engine: str | None = None
    max_model_len: int | None = None
    kv_cache: dict | None = None
    metrics_problem: str | None = None

    def document(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "metrics_problem"}


def _cache_config(family) -> dict:
    labels = family.samples[0].labels if family.samples else {}
    config = {}
    for name, kind in CACHE_CONFIG_LABELS.items():
        try:
            config[name] = kind(labels[name])
        except (KeyError, ValueError):
            continue  # not on this engine version's page, or "None"
    return config


def read_metrics_page(text: str) -> tuple[str | None, dict | None]:
    """(the engine its metric names say, vLLM's cache_config_info figures) of one /metrics page."""
    names = [line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    engine = next((engine for prefix, engine in METRIC_PREFIXES if any(n.startswith(prefix) for n in names)), None)
    info = "\n".join(line for line in text.splitlines() if line.startswith("vllm:cache_config_info"))
    kv_cache = None
    for family in text_string_to_metric_families(info):
        kv_cache = _cache_config(family) or None
    return engine, kv_cache


def server_facts(declared: dict, base_url: str, served_model: str, report: ServerReport) -> dict:
    """metadata.json's `server` for a --url run: named by what its user declared (the GPU is `remote` when
    undeclared), the engine the server reports where --backend was not given, with `reported` holding what
    it told and `batch_limits` the per-step limits known: a declared --max-num-seqs, the KV cache it told."""
    reported_backend = report.engine if report.engine != "tokenrig" else None
    facts = {"backend": declared.get("backend") or reported_backend or "url", "url": base_url,
             "model": declared.get("model", served_model), "gpu": declared.get("gpu", "remote"),
             **{key: declared[key] for key in ("quant", "tp") if key in declared},
             "served_model": served_model, "declared": sorted(declared), "reported": report.document()}
    kv_cache = report.kv_cache or {}
    limits = BatchLimits.known(max_num_seqs=declared.get("max_num_seqs"),
                               kv_cache_tokens=kv_cache.get("kv_cache_size_tokens"),
                               kv_cache_blocks=kv_cache.get("num_gpu_blocks"),
                               kv_block_tokens=kv_cache.get("block_size"),
                               gpu_memory_utilization=kv_cache.get("gpu_memory_utilization"))
    if limits.model_fields_set:
        facts["batch_limits"] = limits.model_dump(exclude_unset=True)
    return facts


@dataclass
class RemoteServer:
    base_url: str
    api_key: str | None = None

    def _open(self, path: str, body: dict | None = None, timeout: float = 30):
        request = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json", **auth_headers(self.api_key)})
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError:  # the server answered: the caller reads its status
            raise
        except (OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise RemoteError(f"{self.base_url}: TLS certificate verification failed ({reason.verify_message}): "
                                  "trust the CA that signed the server's certificate with --ca-cert FILE (or "
                                  "SSL_CERT_FILE=FILE)") from None
            raise RemoteError(f"cannot reach {self.base_url}: {reason}; is the server up, and is --url right "
                              "(scheme, host, port)?") from None

    def models(self, asked: str | None = None) -> list[dict] | None:
        """The /v1/models entries, or None when the server does not say (a 404 only with the model `asked`)."""
        try:
            with self._open("/v1/models") as response:
                return json.load(response).get("data") or []
        except urllib.error.HTTPError as error:
            if error.code in (401, 403):
                raise RemoteError(_auth_problem(self.base_url, error.code, self.api_key)) from None
            if error.code == 404 and asked is None:  # a wrong --url path answers 404 too: no name to guess
                detail = error.read()[:100].decode(errors="replace").strip()
                raise RemoteError(f"{self.base_url}/v1/models answered HTTP 404 ({detail or 'no body'}) when asked "
                                  "which model it serves: check --url (its path comes before /v1), or name the "
                                  "model with --served-model NAME") from None
            return None
        except ValueError:
            return None

    def served_model(self, asked: str | None, profile_key: str) -> tuple[str, dict]:
        """(model name to send, its /v1/models entry, {} when the server has no such route): --served-model,
        else the one model /v1/models lists (or the model profile's name among several)."""
        models = self.models(asked)
        if models is None:
            return asked or profile_key, {}
        names = [entry["id"] for entry in models if entry.get("id")]  # an entry without one cannot be asked for
        if asked is None:
            if profile_key in names:
                asked = profile_key
            elif len(names) == 1:
                asked = names[0]
            else:
                raise RemoteError(f"{self.base_url} serves {', '.join(map(str, names)) or 'no model'}: "
                                  "choose one with --served-model NAME")
        entry = next((m for m in models if m.get("id") == asked), None)
        if entry is None:
            raise RemoteError(f"{self.base_url} does not serve {asked!r} (it serves {', '.join(map(str, names))}): "
                              "pass --served-model NAME")
        return asked, entry

    def report(self, entry: dict) -> ServerReport:
        """What the server tells of itself, from its /v1/models entry and one /metrics page (none: no figures)."""
        context = entry.get("max_model_len")
        owned_by = entry.get("owned_by") if isinstance(entry.get("owned_by"), str) else None
        engine, kv_cache, problem = None, None, None
        try:  # one look at /metrics before the load: what it names, and whether it is a page to scrape at all
            with self._open("/metrics", timeout=10) as response:
                text = response.read().decode(errors="replace")
            parse_metrics(text)
            engine, kv_cache = read_metrics_page(text)
        except urllib.error.HTTPError as error:
            problem = f"answered HTTP {error.code}"
        except ValueError as error:
            problem = f"is not a Prometheus page ({error})"
        except RemoteError:
            pass  # unreachable for now: the scraper counts its failures
        return ServerReport(owned_by=owned_by, engine=OWNERS.get(owned_by or "") or engine,
                            max_model_len=context if isinstance(context, int) and context > 0 else None,
                            kv_cache=kv_cache, metrics_problem=problem)

    def preflight(self, path: str, model: str, chat: bool) -> str | None:
        """One two-token streaming request before the load: it must stream. A busy server (429, 5xx) is no
        mistake in the command: the load test goes on, and measures it; the returned note says so."""
        body = {"model": model, "max_tokens": 2, "stream": True}
        body.update({"messages": [{"role": "user", "content": "hello"}]} if chat else {"prompt": "hello"})
        try:
            with self._open(path, body) as response:
                content_type = response.headers.get("Content-Type") or ""
                if not content_type.startswith(STREAM_TYPE):
                    raise RemoteError(f"{self.base_url}{path} answered a streaming request with {content_type or 'no'} "
                                      f"content, not an event stream: is this an OpenAI-compatible server?")
        except urllib.error.HTTPError as error:
            detail = error.read()[:200].decode(errors="replace")
            if error.code in (401, 403):
                raise RemoteError(_auth_problem(self.base_url, error.code, self.api_key)) from None
            if error.code == 404:
                raise RemoteError(f"{self.base_url}{path}: HTTP 404 for model {model!r} ({detail}): pass the served "
                                  "name with --served-model, or check --url") from None
            if error.code == 429 or error.code >= 500:
                return (f"the test request to {self.base_url}{path} got HTTP {error.code} ({detail}); "
                        "load testing anyway")
            raise RemoteError(f"{self.base_url}{path}: HTTP {error.code} to a test request ({detail})") from None
        return None


def _auth_problem(base_url: str, code: int, api_key: str | None) -> str:
    given = "the API key given was refused" if api_key else "no API key was given"
    return f"{base_url}: HTTP {code}, {given}: pass --api-key KEY or set OPENAI_API_KEY"


HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # a Hugging Face repository id: NAME or ORG/NAME
HUB_PROBE_TIMEOUT_S = 10.0


def tokenizer_dir(value: str) -> Path:
    """--tokenizer: a directory holding tokenizer.json, that file itself, or a Hugging Face Hub model name
    (its tokenizer from the Hub's cache, else fetched, written as tokenizer.json under tokenrig's models)."""
    path = Path(value).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return path
    if path.is_file() and path.name == "tokenizer.json":
        return path.parent
    if path.exists() or value.endswith(".json") or not HUB_NAME.match(value):
        raise RemoteError(f"--tokenizer {value}: give a directory holding tokenizer.json, the tokenizer.json file, "
                          "or a Hugging Face model name (ORG/NAME)")
    return _hub_tokenizer(value)


def _hub_tokenizer(name: str) -> Path:
    """The directory of Hub model `name`'s tokenizer.json: the Hub's cache when it holds it, else the Hub, probed
    first so that an unreachable one fails at once, not after the download's retries. A model with no
    tokenizer.json has its tokenizer converted by transformers and written under tokenrig's models."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(name, "tokenizer.json", local_files_only=True)).parent
    except OSError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise RemoteError(f"--tokenizer {name}: not a local path, and not in the Hugging Face cache "
                          f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set: give a local tokenizer.json "
                          "or its directory")
    _probe_hub(name, constants.ENDPOINT)
    try:
        try:
            return Path(hf_hub_download(name, "tokenizer.json")).parent
        except RemoteEntryNotFoundError:  # a slow (e.g. SentencePiece-only) tokenizer: transformers converts it
            from transformers import AutoTokenizer

            from tokenrig.serve.checkpoint import default_models_dir

            backend = AutoTokenizer.from_pretrained(name).backend_tokenizer
            out = default_models_dir() / "hub-tokenizers" / name.replace("/", "--")
            out.mkdir(parents=True, exist_ok=True)
            backend.save(str(out / "tokenizer.json"))
            return out
    except (OSError, ValueError, AttributeError) as error:
        reason = str(error).strip().splitlines()[0][:200]
        raise RemoteError(f"--tokenizer {name}: the Hugging Face Hub did not give its tokenizer ({reason}); check "
                          "the name, set HF_TOKEN for a gated model, or give a local tokenizer.json") from None


def _probe_hub(name: str, endpoint: str) -> None:
    """Any HTTP answer from the Hub's endpoint will do; no answer within the timeout is one line."""
    try:
        urllib.request.urlopen(f"{endpoint}/api/models/{name}", timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the Hub answered (a missing or gated model is for the download to name)
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise RemoteError(f"--tokenizer {name}: not a local path, and the Hugging Face Hub at {endpoint} cannot be "
                          f"reached ({reason}): give a local tokenizer.json or its directory, or set HF_ENDPOINT "
                          "to a reachable mirror") from None
