"""A server tokenrig did not start (`loadtest --url`): the URL made whole, the model it serves, its API
key, the tokenizer prompt lengths are counted with (a local file, or a Hugging Face Hub model's), and a
pre-flight request that stops the run before
any load with one line naming the fix (server down, wrong key, model not served, no event stream).

The API key only ever travels in request headers: nothing here writes it to metadata or logs.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

STREAM_TYPE = "text/event-stream"


class RemoteError(Exception):
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
    """What `loadtest --url` was given: the URL as typed, the key, the served model name, a tokenizer path."""

    url: str
    api_key: str | None = None
    served_model: str | None = None
    tokenizer: Path | None = None  # the directory of the tokenizer --tokenizer names (tokenizer_dir)


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
            raise RemoteError(f"cannot reach {self.base_url}: {reason}; is the server up, and is --url right "
                              "(scheme, host, port)?") from None

    def models(self) -> list[dict] | None:
        """The /v1/models entries, or None when the server has no such route."""
        try:
            with self._open("/v1/models") as response:
                return json.load(response).get("data") or []
        except urllib.error.HTTPError as error:
            if error.code in (401, 403):
                raise RemoteError(_auth_problem(self.base_url, error.code, self.api_key)) from None
            return None
        except ValueError:
            return None

    def served_model(self, asked: str | None, profile_key: str) -> tuple[str, int | None]:
        """(model name to send, its max_model_len if the server says): --served-model, else the one model
        /v1/models lists (or the model profile's name among several)."""
        models = self.models()
        if models is None:
            return asked or profile_key, None
        names = [entry.get("id") for entry in models]
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
        context = entry.get("max_model_len")
        return asked, context if isinstance(context, int) and context > 0 else None

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
                return f"the test request to {self.base_url}{path} got HTTP {error.code} ({detail}); load testing anyway"
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
