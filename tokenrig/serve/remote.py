"""A server tokenrig did not start (`loadtest --url`): the URL made whole, the model it serves, its API
key, the tokenizer prompt lengths are counted with, and a pre-flight request that stops the run before
any load with one line naming the fix (server down, wrong key, model not served, no event stream).

The API key only ever travels in request headers: nothing here writes it to metadata or logs.
"""

from __future__ import annotations

import json
import ssl
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
    tokenizer: Path | None = None


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

    def served_model(self, asked: str | None, profile_key: str) -> tuple[str, int | None]:
        """(model name to send, its max_model_len if the server says): --served-model, else the one model
        /v1/models lists (or the model profile's name among several)."""
        models = self.models(asked)
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


def tokenizer_dir(path: Path) -> Path:
    """--tokenizer: a directory holding tokenizer.json, or that file itself."""
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return path
    if path.is_file() and path.name == "tokenizer.json":
        return path.parent
    raise RemoteError(f"--tokenizer {path}: give a directory holding tokenizer.json, or the tokenizer.json file")
