"""LLM providers: `complete(system, messages) -> Completion` over the official OpenAI and
Anthropic SDKs, any OpenAI-compatible server (vLLM, SGLang, Ollama, llama.cpp), and scripted
replies; every call records its tokens, cost and latency.

HTTP retries and timeouts are the SDKs' own (`max_retries=`, `timeout=` on the client).
Retrying a reply that is useless (no code block, wrong class name) is the search loop's job.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
import tomllib
import warnings
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field

ProviderKind = Literal["openai", "anthropic", "openai-compatible", "scripted"]
SPEC_FORMS = "openai:MODEL, anthropic:MODEL, openai-compatible:MODEL@URL or scripted:PATH, optionally followed by *WEIGHT"
DEFAULT_ANTHROPIC_MODEL = "claude-sonnet-5-5"
DEFAULT_OPENAI_MODEL = "gpt-6.2-sol"
SCRIPTED_DEMO = "scripted:examples/scripted/"
NO_KEY = "EMPTY"  # what an OpenAI-compatible server without authentication is sent as a key


class ProviderError(Exception):
    """A provider cannot be set up or did not answer; the message says what to do."""


class ProviderExhausted(ProviderError):
    """A scripted provider has no replies left; the search loop stops cleanly."""


class UnknownPriceWarning(UserWarning):
    """A model is not in evo/prices.toml, so its calls count as costing nothing."""


class LLMSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ProviderKind
    model: str  # the name the API knows; for scripted replies, the file or directory name
    base_url: str | None = None  # openai-compatible only: the server, e.g. http://localhost:8000/v1
    path: Path | None = None  # scripted only: a directory of candidate .py files or a .jsonl file
    weight: float = Field(default=1.0, gt=0)  # relative share of the calls in a ProviderMix

    def __str__(self) -> str:
        where = {"openai-compatible": f"{self.model}@{self.base_url}", "scripted": str(self.path)}
        text = f"{self.kind}:{where.get(self.kind, self.model)}"
        return text if self.weight == 1 else f"{text}*{self.weight:g}"


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["user", "assistant"]
    content: str


class Completion(BaseModel):
    model_config = ConfigDict(frozen=True)

    text: str  # the reply's text (Anthropic thinking blocks left out)
    provider: ProviderKind
    model: str
    input_tokens: int  # every prompt token, those read from or written to a cache included
    output_tokens: int  # reasoning tokens included, as billed
    cached_input_tokens: int  # the part of input_tokens read from the provider's prompt cache
    cost_usd: float  # from evo/prices.toml; 0 for scripted replies and unpriced models
    latency_s: float  # wall time of the call, the SDK's retries included
    scripted: bool  # a scripted reply: token counts are estimates and nothing was paid
    finish_reason: str | None  # "stop"/"end_turn" when done; "length"/"max_tokens" when cut off


class ProviderSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(default=300.0, gt=0)  # one HTTP attempt
    max_retries: int = Field(default=4, ge=0)  # the SDK's retries on 408/409/429/5xx, timeouts and lost connections
    max_output_tokens: int = Field(default=16000, ge=1)  # thinking included where the model thinks
    temperature: float | None = Field(default=None, ge=0, le=2)  # None: the model's default (some reject others)


class Provider(Protocol):
    spec: LLMSpec

    def complete(self, system: str, messages: list[Message]) -> Completion: ...


# ---- specs ----------------------------------------------------------------------------------

def parse_spec(text: str) -> LLMSpec:
    """`openai:gpt-5`, `anthropic:claude-sonnet-5-5*3`, `openai-compatible:qwen@http://host:8000/v1`, `scripted:DIR`."""
    body, weight = text.strip(), 1.0
    if "*" in body:
        body, _, tail = body.rpartition("*")
        try:
            weight = float(tail)
        except ValueError:
            weight = 0.0
        if not 0 < weight < float("inf"):
            raise ProviderError(f"the weight in --llm {text!r} is not a positive number; write e.g. {body.strip()}*2")
        body = body.strip()
    kind, colon, rest = body.partition(":")
    if not colon or not rest.strip():
        raise ProviderError(f"--llm {text!r} is not a provider spec; write {SPEC_FORMS}")
    rest = rest.strip()
    if kind in ("openai", "anthropic"):
        return LLMSpec(kind=kind, model=rest, weight=weight)
    if kind == "openai-compatible":
        match = re.fullmatch(r"(.+?)@(https?://\S+)", rest)
        if not match:
            raise ProviderError(f"--llm {text!r} names no server; write openai-compatible:MODEL@http://HOST:PORT/v1")
        return LLMSpec(kind=kind, model=match[1], base_url=match[2], weight=weight)
    if kind == "scripted":
        path = Path(rest)
        return LLMSpec(kind=kind, model=path.name or rest, path=path, weight=weight)
    raise ProviderError(f"unknown provider kind {kind!r} in --llm {text!r}; write {SPEC_FORMS}")


def default_specs_from_environment() -> list[LLMSpec]:
    """What to use when no --llm is given: every provider whose key is set, else an OpenAI-compatible server."""
    specs = []
    if os.environ.get("ANTHROPIC_API_KEY"):
        specs.append(LLMSpec(kind="anthropic", model=DEFAULT_ANTHROPIC_MODEL))
    if os.environ.get("OPENAI_API_KEY"):
        specs.append(LLMSpec(kind="openai", model=DEFAULT_OPENAI_MODEL))
    base_url = os.environ.get("OPENAI_BASE_URL")
    if not specs and base_url:
        specs.append(LLMSpec(kind="openai-compatible", model=served_model(base_url), base_url=base_url))
    if not specs:
        raise ProviderError(
            "no LLM is configured; export ANTHROPIC_API_KEY or OPENAI_API_KEY, set OPENAI_BASE_URL to an "
            "OpenAI-compatible server, or pass --llm (openai:MODEL, anthropic:MODEL, "
            f"openai-compatible:MODEL@URL, or {SCRIPTED_DEMO} for a demo without an LLM)")
    return specs


def served_model(base_url: str) -> str:
    """The first model an OpenAI-compatible server lists (vLLM and SGLang serve exactly one)."""
    import openai

    client = openai.OpenAI(api_key=os.environ.get("OPENAI_API_KEY") or NO_KEY, base_url=base_url,
                           timeout=10, max_retries=1)
    try:
        models = [entry.id for entry in client.models.list()]
    except (openai.APIError, ValueError, AttributeError, TypeError) as err:
        raise ProviderError(f"could not list the models served at {base_url} ({type(err).__name__}); "
                            "check that the server is up, or pass --llm openai-compatible:MODEL@URL") from None
    if not models:
        raise ProviderError(f"the server at {base_url} serves no model; load one, or pass --llm openai-compatible:MODEL@URL")
    return models[0]


# ---- prices ---------------------------------------------------------------------------------

@cache
def price_table() -> dict[str, dict[str, float]]:
    return tomllib.loads(resources.files("evo").joinpath("prices.toml").read_text())["models"]


def price_for(model: str) -> dict[str, float] | None:
    """USD per million tokens: the exact name, else the longest listed name it extends with '-'."""
    table = price_table()
    if model in table:
        return table[model]
    prefixes = [name for name in table if model.startswith(name + "-")]
    return table[max(prefixes, key=len)] if prefixes else None


warned_models: set[str] = set()


def cost_usd(model: str, input_tokens: int, cached_input_tokens: int, output_tokens: int,
             cache_write_tokens: int = 0) -> float:
    price = price_for(model)
    if price is None:
        if model not in warned_models:
            warned_models.add(model)
            warnings.warn(f"no price is known for model {model!r}, so its calls count as $0 against the "
                          "budget; add it to evo/prices.toml if it is not free", UnknownPriceWarning, stacklevel=3)
        return 0.0
    uncached = input_tokens - cached_input_tokens - cache_write_tokens
    return (uncached * price["input"] + cached_input_tokens * price["cached_input"]
            + cache_write_tokens * price.get("cache_write", price["input"])
            + output_tokens * price["output"]) / 1e6


# ---- providers over the SDKs ------------------------------------------------------------------

class OpenAIProvider:
    """`openai:` (api.openai.com, or OPENAI_BASE_URL) and `openai-compatible:` servers; Chat Completions."""

    def __init__(self, spec: LLMSpec, settings: ProviderSettings):
        import openai

        self.spec, self.settings, self.sdk = spec, settings, openai
        if spec.kind == "openai":
            key, base_url = os.environ.get("OPENAI_API_KEY"), os.environ.get("OPENAI_BASE_URL") or None
            if not key:
                raise ProviderError("OPENAI_API_KEY is not set; export it, or pick another provider with --llm "
                                    "(anthropic:MODEL, openai-compatible:MODEL@URL, scripted:DIR)")
        else:  # a local server usually wants no key; send OPENAI_API_KEY where the user has one
            key, base_url = os.environ.get("OPENAI_API_KEY") or NO_KEY, spec.base_url
        self.endpoint = base_url or "https://api.openai.com/v1"
        self.name = str(spec) if spec.kind == "openai-compatible" else f"{spec} at {self.endpoint}"
        self.client = openai.OpenAI(api_key=key, base_url=base_url, timeout=settings.timeout_s,
                                    max_retries=settings.max_retries)

    def complete(self, system: str, messages: list[Message]) -> Completion:
        request = {"model": self.spec.model,
                   "messages": [{"role": "system", "content": system}, *(m.model_dump() for m in messages)]}
        # OpenAI's reasoning models refuse max_tokens; self-hosted servers do not all know its successor.
        limit = "max_completion_tokens" if self.spec.kind == "openai" else "max_tokens"
        request[limit] = self.settings.max_output_tokens
        if self.settings.temperature is not None:
            request["temperature"] = self.settings.temperature
        started = time.monotonic()
        try:
            response = self.client.chat.completions.create(**request)
        except (self.sdk.APIError, ValueError) as err:
            raise sdk_failure(err, self, "a Chat Completions response", "OPENAI_API_KEY") from None
        latency = time.monotonic() - started
        try:
            choice, usage = response.choices[0], response.usage  # some servers send no usage
            details = getattr(usage, "prompt_tokens_details", None)
            cached = int(getattr(details, "cached_tokens", None) or 0)
            tokens_in = int(getattr(usage, "prompt_tokens", None) or 0)
            tokens_out = int(getattr(usage, "completion_tokens", None) or 0)
            text, finish = choice.message.content or "", choice.finish_reason
        except (AttributeError, IndexError, TypeError, ValueError) as err:
            raise malformed(self.name, "a Chat Completions response", err) from None
        return Completion(text=text, provider=self.spec.kind, model=self.spec.model, input_tokens=tokens_in,
                          output_tokens=tokens_out, cached_input_tokens=cached,
                          cost_usd=cost_usd(self.spec.model, tokens_in, cached, tokens_out),
                          latency_s=latency, scripted=False, finish_reason=finish)


class AnthropicProvider:
    """`anthropic:` through the Messages API, the system prompt marked as a cacheable prefix."""

    def __init__(self, spec: LLMSpec, settings: ProviderSettings):
        import anthropic

        self.spec, self.settings, self.sdk = spec, settings, anthropic
        key, base_url = os.environ.get("ANTHROPIC_API_KEY"), os.environ.get("ANTHROPIC_BASE_URL") or None
        if not key:
            raise ProviderError("ANTHROPIC_API_KEY is not set; export it, or pick another provider with --llm "
                                "(openai:MODEL, openai-compatible:MODEL@URL, scripted:DIR)")
        self.endpoint = base_url or "https://api.anthropic.com"
        self.name = f"{spec} at {self.endpoint}"
        self.client = anthropic.Anthropic(api_key=key, base_url=base_url, timeout=settings.timeout_s,
                                          max_retries=settings.max_retries)

    def complete(self, system: str, messages: list[Message]) -> Completion:
        request = {"model": self.spec.model, "max_tokens": self.settings.max_output_tokens,
                   "messages": [m.model_dump() for m in messages]}
        if system:  # the API refuses an empty text block, cache_control or not
            request["system"] = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
        if self.settings.temperature is not None:
            request["temperature"] = self.settings.temperature
        started = time.monotonic()
        try:
            response = self.client.messages.create(**request)
        except (self.sdk.APIError, ValueError) as err:
            raise sdk_failure(err, self, "a Messages API response", "ANTHROPIC_API_KEY") from None
        latency = time.monotonic() - started
        try:
            usage = response.usage
            read = int(getattr(usage, "cache_read_input_tokens", None) or 0)
            written = int(getattr(usage, "cache_creation_input_tokens", None) or 0)
            tokens_in, tokens_out = int(usage.input_tokens) + read + written, int(usage.output_tokens)
            text = "".join(block.text for block in response.content if getattr(block, "type", None) == "text")
            finish = response.stop_reason
        except (AttributeError, TypeError, ValueError) as err:
            raise malformed(self.name, "a Messages API response", err) from None
        return Completion(text=text, provider="anthropic", model=self.spec.model, input_tokens=tokens_in,
                          output_tokens=tokens_out, cached_input_tokens=read,
                          cost_usd=cost_usd(self.spec.model, tokens_in, read, tokens_out, written),
                          latency_s=latency, scripted=False, finish_reason=finish)


def sdk_failure(err: Exception, provider: OpenAIProvider | AnthropicProvider, expected: str,
                key_variable: str) -> ProviderError:
    """One sentence for an error the SDK raised once its own retries were spent."""
    sdk, settings, endpoint, who = provider.sdk, provider.settings, provider.endpoint, provider.name
    retries = f"{settings.max_retries} retr{'y' if settings.max_retries == 1 else 'ies'}"
    if isinstance(err, sdk.APITimeoutError):
        return ProviderError(f"{who} did not answer within {settings.timeout_s:g} s, even after {retries}; "
                             "raise the timeout, or check that the server is up and not overloaded")
    if isinstance(err, sdk.APIConnectionError):
        cause = err.__cause__ or err
        return ProviderError(f"could not reach {endpoint} for {provider.spec} after {retries} ({cause}); "
                             "check that the server is running and that the URL is right")
    if isinstance(err, sdk.APIStatusError):
        status, detail = err.status_code, server_message(err)
        if status == 401:
            return ProviderError(f"{who} refused the API key (HTTP 401: {detail}); check {key_variable}")
        if status == 403:
            return ProviderError(f"{who} refused access (HTTP 403: {detail}); check that the key may use this model")
        if status == 404:
            where = "" if provider.spec.kind == "anthropic" else ", and that the URL ends in /v1 where the server wants it"
            return ProviderError(f"{who} answered HTTP 404 ({detail}); check the model name{where}")
        if status == 429:
            return ProviderError(f"{who} was still rate-limited after {retries} (HTTP 429: {detail}); "
                                 "wait, make fewer requests at a time, or check the account's quota")
        if status >= 500:
            return ProviderError(f"{who} still failed after {retries} (HTTP {status}: {detail}); "
                                 "try again later or pick another provider with --llm")
        return ProviderError(f"{who} rejected the request (HTTP {status}: {detail}); check the model name and settings")
    return malformed(who, expected, err)


def server_message(err) -> str:
    body = err.body if isinstance(err.body, dict) else {}
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    text = inner.get("message") if isinstance(inner.get("message"), str) else err.message
    return " ".join(text.split())[:200]


def malformed(who: str, expected: str, err: Exception) -> ProviderError:
    return ProviderError(f"{who} sent something that is not {expected} "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:160]}); "
                         "check that the URL points at the right kind of server")


# ---- scripted replies -------------------------------------------------------------------------

class ScriptedProvider:
    """Replies in order with the .py files of a directory (sorted by name, each in a ```python block,
    as an LLM would reply) or with the "reply" fields of a JSONL file; then raises ProviderExhausted."""

    def __init__(self, spec: LLMSpec, settings: ProviderSettings | None = None):
        self.spec, self.path, self.next_index = spec, spec.path, 0
        self.lock = threading.Lock()  # the search loop may ask from several threads
        if self.path is None or not self.path.exists():
            raise ProviderError(f"the scripted replies {str(self.path)!r} do not exist; pass a directory of "
                                "candidate .py files or a .jsonl file with one {\"reply\": ...} per line")
        if self.path.is_dir():
            self.replies: list[Path | str] = sorted(p for p in self.path.glob("*.py") if p.is_file())
        elif self.path.suffix == ".jsonl":
            self.replies = read_jsonl_replies(self.path)
        else:
            raise ProviderError(f"the scripted replies {str(self.path)!r} are neither a directory nor a .jsonl "
                                "file; pass a directory of candidate .py files or a .jsonl file")
        if not self.replies:
            raise ProviderError(f"the scripted replies {str(self.path)!r} hold no reply; add candidate .py files "
                                "or JSONL lines")

    def complete(self, system: str, messages: list[Message]) -> Completion:
        started = time.monotonic()
        with self.lock:
            if self.next_index >= len(self.replies):
                raise ProviderExhausted(f"the {len(self.replies)} scripted replies in {self.path} are used up; "
                                        "add more, or switch to an LLM with --llm")
            reply = self.replies[self.next_index]
            self.next_index += 1
        text = f"```python\n{reply.read_text().rstrip()}\n```\n" if isinstance(reply, Path) else reply
        prompt_chars = len(system) + sum(len(m.content) for m in messages)
        # No tokenizer for a scripted reply: about 4 characters per token, good enough for a report.
        return Completion(text=text, provider="scripted", model=self.spec.model, input_tokens=prompt_chars // 4,
                          output_tokens=len(text) // 4, cached_input_tokens=0, cost_usd=0.0,
                          latency_s=time.monotonic() - started, scripted=True, finish_reason="stop")


def read_jsonl_replies(path: Path) -> list[str]:
    replies = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            reply = json.loads(line).get("reply")
        except (json.JSONDecodeError, AttributeError):
            reply = None
        if not isinstance(reply, str):
            raise ProviderError(f"line {number} of {path} is not a JSON object with a \"reply\" string; fix or remove it")
        replies.append(reply)
    return replies


# ---- choosing among several -----------------------------------------------------------------

def make_provider(spec: LLMSpec, settings: ProviderSettings | None = None) -> Provider:
    settings = settings or ProviderSettings()
    if spec.kind == "anthropic":
        return AnthropicProvider(spec, settings)
    if spec.kind == "scripted":
        return ScriptedProvider(spec, settings)
    return OpenAIProvider(spec, settings)


class ProviderMix:
    """Several providers; each call goes to one drawn by weight from a seeded generator, so a run
    with the same seed asks the same providers in the same order. The Completion names who answered."""

    def __init__(self, providers: Sequence[Provider], seed: int = 0):
        if not providers:
            raise ProviderError(f"no LLM provider was given; pass --llm ({SPEC_FORMS})")
        self.providers = list(providers)
        self.weights = [provider.spec.weight for provider in self.providers]
        self.random = random.Random(seed)
        self.lock = threading.Lock()

    @classmethod
    def from_specs(cls, specs: Sequence[LLMSpec], settings: ProviderSettings | None = None,
                   seed: int = 0) -> ProviderMix:
        return cls([make_provider(spec, settings) for spec in specs], seed)

    def pick(self) -> Provider:
        with self.lock:
            return self.random.choices(self.providers, weights=self.weights)[0]

    def complete(self, system: str, messages: list[Message]) -> Completion:
        return self.pick().complete(system, messages)
