"""evo.provider: the real OpenAI and Anthropic SDKs over real HTTP to a local server (tests/llm_server.py)."""

from __future__ import annotations

import json
import time
import tomllib
import uuid
import warnings
from pathlib import Path

import pytest

from evo.provider import (DEFAULT_ANTHROPIC_MODEL, DEFAULT_OPENAI_MODEL, Completion, LLMSpec, Message,
                          ProviderError, ProviderExhausted, ProviderMix, ProviderSettings, UnknownPriceWarning,
                          default_specs_from_environment, make_provider, parse_spec, price_for, price_table)
from tests.llm_server import Fail, Garbage, LLMServer, Reply, Stall

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You write CUDA kernels. The task and the rules follow; they are the same on every call."
ASK = [Message(role="user", content="Make this ReLU faster.")]
FAST = ProviderSettings(timeout_s=5, max_retries=2)
SDK_KINDS = ["openai", "anthropic", "openai-compatible"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL",
                 "ANTHROPIC_AUTH_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server():
    with LLMServer() as running:
        yield running


def provider_at(server: LLMServer, kind: str, monkeypatch, settings=FAST, model: str | None = None):
    """A provider of `kind` pointed at the local server the way a user would point it elsewhere."""
    if kind == "openai":
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1")
        spec = LLMSpec(kind="openai", model=model or "gpt-5")
    elif kind == "anthropic":
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        spec = LLMSpec(kind="anthropic", model=model or "claude-sonnet-5")
    else:
        spec = LLMSpec(kind="openai-compatible", model=model or "gpt-5", base_url=f"{server.url}/v1")
    return make_provider(spec, settings)


def api_path(kind: str) -> str:
    return "/v1/messages" if kind == "anthropic" else "/v1/chat/completions"


# ---- calls over HTTP -------------------------------------------------------------------------

@pytest.mark.parametrize("kind, model, expected_cost", [
    ("openai", "gpt-5", (200 * 1.25 + 1000 * 0.125 + 300 * 10.0) / 1e6),
    ("openai-compatible", "gpt-5", (200 * 1.25 + 1000 * 0.125 + 300 * 10.0) / 1e6),
    ("anthropic", "claude-sonnet-5", (200 * 2.0 + 1000 * 0.20 + 300 * 10.0) / 1e6),
])
def test_a_call_returns_text_tokens_cost_and_latency(server, monkeypatch, kind, model, expected_cost):
    server.queue(Reply(text="```python\nclass ModelNew: ...\n```", input_tokens=1200, cached_tokens=1000,
                       output_tokens=300))
    completion = provider_at(server, kind, monkeypatch, model=model).complete(SYSTEM, ASK)
    assert completion.text == "```python\nclass ModelNew: ...\n```"
    assert (completion.provider, completion.model, completion.scripted) == (kind, model, False)
    assert (completion.input_tokens, completion.cached_input_tokens, completion.output_tokens) == (1200, 1000, 300)
    assert completion.cost_usd == pytest.approx(expected_cost)
    assert 0 < completion.latency_s < 5
    assert completion.finish_reason == ("end_turn" if kind == "anthropic" else "stop")
    assert len(server.requests_to(api_path(kind))) == 1


def test_openai_request_puts_the_system_prompt_first_and_sends_the_key(server, monkeypatch):
    settings = ProviderSettings(timeout_s=5, max_retries=0, max_output_tokens=1234, temperature=0.25)
    provider_at(server, "openai", monkeypatch, settings).complete(SYSTEM, ASK)
    request = server.received[-1]
    assert request.body["messages"] == [{"role": "system", "content": SYSTEM},
                                        {"role": "user", "content": ASK[0].content}]
    assert request.body["max_completion_tokens"] == 1234 and "max_tokens" not in request.body
    assert request.body["temperature"] == 0.25
    assert request.headers["authorization"] == "Bearer test-key"


def test_openai_compatible_needs_no_key_and_sends_max_tokens(server, monkeypatch):
    provider_at(server, "openai-compatible", monkeypatch).complete(SYSTEM, ASK)
    request = server.received[-1]
    assert request.headers["authorization"] == "Bearer EMPTY"
    assert request.body["max_tokens"] == FAST.max_output_tokens and "temperature" not in request.body


def test_anthropic_marks_the_system_prompt_as_a_cacheable_prefix(server, monkeypatch):
    provider_at(server, "anthropic", monkeypatch).complete(SYSTEM, ASK)
    body = server.requests_to("/v1/messages")[0].body
    assert body["system"] == [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    assert body["messages"] == [{"role": "user", "content": ASK[0].content}]
    assert body["max_tokens"] == FAST.max_output_tokens and "temperature" not in body


@pytest.mark.parametrize("status", [429, 500])
@pytest.mark.parametrize("kind", SDK_KINDS)
def test_a_failed_attempt_is_retried_by_the_sdk(server, monkeypatch, kind, status):
    server.queue(Fail(status), Reply(text="second time lucky"))
    started = time.monotonic()
    completion = provider_at(server, kind, monkeypatch).complete(SYSTEM, ASK)
    assert completion.text == "second time lucky"
    assert len(server.requests_to(api_path(kind))) == 2
    assert time.monotonic() - started < 3  # the server's retry-after-ms: 1 was honoured


@pytest.mark.parametrize("kind", SDK_KINDS)
def test_failing_every_retry_is_one_provider_error(server, monkeypatch, kind):
    server.queue(Fail(503), Fail(503), Fail(503))
    with pytest.raises(ProviderError, match=r"still failed after 2 retries \(HTTP 503: simulated HTTP 503\)"):
        provider_at(server, kind, monkeypatch).complete(SYSTEM, ASK)
    assert len(server.requests_to(api_path(kind))) == 3


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_server_that_never_answers_times_out_after_the_sdk_retries(server, monkeypatch, kind):
    server.queue(Stall(30), Stall(30), Stall(30))
    provider = provider_at(server, kind, monkeypatch, ProviderSettings(timeout_s=0.3, max_retries=1))
    started = time.monotonic()
    with pytest.raises(ProviderError, match=r"did not answer within 0\.3 s, even after 1 retry"):
        provider.complete(SYSTEM, ASK)
    assert 0.6 <= time.monotonic() - started < 5  # two attempts of 0.3 s and one short back-off
    assert len(server.requests_to(api_path(kind))) == 2


@pytest.mark.parametrize("garbage", [Garbage(), Garbage(content_type="text/html"), Garbage(body=b"{}"),
                                     Garbage(body=b'{"choices": [], "content": 7}')])
@pytest.mark.parametrize("kind", SDK_KINDS)
def test_a_malformed_body_is_a_provider_error(server, monkeypatch, kind, garbage):
    server.queue(garbage)
    with pytest.raises(ProviderError, match="is not a"):
        provider_at(server, kind, monkeypatch).complete(SYSTEM, ASK)


@pytest.mark.parametrize("kind, variable", [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")])
def test_a_refused_key_is_not_retried_and_names_the_variable(server, monkeypatch, kind, variable):
    server.queue(Fail(401))
    with pytest.raises(ProviderError, match=f"refused the API key .*; check {variable}"):
        provider_at(server, kind, monkeypatch).complete(SYSTEM, ASK)
    assert len(server.requests_to(api_path(kind))) == 1


def test_an_unreachable_server_is_a_provider_error():
    spec = parse_spec("openai-compatible:any@http://127.0.0.1:9/v1")  # the discard port: nothing listens
    with pytest.raises(ProviderError, match="could not reach http://127.0.0.1:9/v1"):
        make_provider(spec, ProviderSettings(timeout_s=2, max_retries=0)).complete(SYSTEM, ASK)


def test_a_reply_without_code_is_returned_as_it_is(server, monkeypatch):
    server.queue(Reply(text="I would rather not.", finish="length"))
    completion = provider_at(server, "openai-compatible", monkeypatch).complete(SYSTEM, ASK)
    assert (completion.text, completion.finish_reason) == ("I would rather not.", "length")


@pytest.mark.parametrize("kind, variable", [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")])
def test_a_missing_key_says_which_variable_to_export(kind, variable):
    with pytest.raises(ProviderError, match=f"^{variable} is not set; export it, or pick another provider with --llm"):
        make_provider(LLMSpec(kind=kind, model="m"))


# ---- prices -----------------------------------------------------------------------------------

def test_an_unknown_model_costs_nothing_and_warns_once(server, monkeypatch):
    model = f"home-grown-{uuid.uuid4().hex[:8]}"
    provider = provider_at(server, "openai-compatible", monkeypatch, model=model)
    with pytest.warns(UnknownPriceWarning, match=model):
        assert provider.complete(SYSTEM, ASK).cost_usd == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert provider.complete(SYSTEM, ASK).cost_usd == 0
    assert not [w for w in caught if issubclass(w.category, UnknownPriceWarning)]


def test_prices_match_the_exact_name_then_the_longest_prefix():
    table = price_table()
    assert price_for("gpt-5") is table["gpt-5"]
    assert price_for("gpt-5-mini-2025-08-07") is table["gpt-5-mini"]
    assert price_for("claude-opus-4-1-20250805") is table["claude-opus-4-1"]
    assert price_for("claude-sonnet-4-5-20250929") is table["claude-sonnet-4-5"]
    assert price_for("gpt-5.9") is None and price_for("llama-3-70b") is None


def test_the_price_table_is_well_formed_and_shipped():
    for model, price in price_table().items():
        assert set(price) <= {"input", "cached_input", "output", "cache_write"}, model
        assert 0 < price["cached_input"] <= price["input"] < price["output"], model
    assert price_for(DEFAULT_ANTHROPIC_MODEL) and price_for(DEFAULT_OPENAI_MODEL)
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "prices.toml" in setuptools["package-data"]["evo"]


# ---- specs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("openai:gpt-5", LLMSpec(kind="openai", model="gpt-5")),
    ("openai:gpt-5*3", LLMSpec(kind="openai", model="gpt-5", weight=3)),
    (" anthropic:claude-sonnet-5-5*0.5 ", LLMSpec(kind="anthropic", model="claude-sonnet-5-5", weight=0.5)),
    ("openai-compatible:qwen2.5-coder:32b@http://localhost:11434/v1*2",
     LLMSpec(kind="openai-compatible", model="qwen2.5-coder:32b", base_url="http://localhost:11434/v1", weight=2)),
    ("scripted:examples/scripted/", LLMSpec(kind="scripted", model="scripted", path=Path("examples/scripted"))),
    ("scripted:replies.jsonl", LLMSpec(kind="scripted", model="replies.jsonl", path=Path("replies.jsonl"))),
])
def test_specs_parse_and_print_back(text, expected):
    assert parse_spec(text) == expected
    assert parse_spec(str(expected)) == expected


@pytest.mark.parametrize("text, message", [
    ("gpt-5", "is not a provider spec; write openai:MODEL"),
    ("openai:", "is not a provider spec"),
    ("gemini:pro", "unknown provider kind 'gemini'.*openai-compatible:MODEL@URL"),
    ("openai:gpt-5*0", "weight .* is not a positive number"),
    ("openai:gpt-5*many", "weight .* is not a positive number"),
    ("openai-compatible:qwen", "names no server"),
    ("openai-compatible:qwen@localhost:8000", "names no server"),
])
def test_malformed_specs_say_what_to_write(text, message):
    with pytest.raises(ProviderError, match=message):
        parse_spec(text)


# ---- scripted replies -------------------------------------------------------------------------

def test_a_scripted_directory_replies_with_its_candidates_in_name_order(tmp_path):
    (tmp_path / "b_second.py").write_text("class ModelNew:  # second\n    pass\n")
    (tmp_path / "a_first.py").write_text("class ModelNew:  # first\n    pass\n")
    (tmp_path / "README.md").write_text("not a candidate")
    provider = make_provider(parse_spec(f"scripted:{tmp_path}"))
    first, second = provider.complete(SYSTEM, ASK), provider.complete(SYSTEM, ASK)
    assert first.text == "```python\nclass ModelNew:  # first\n    pass\n```\n"
    assert "# second" in second.text
    assert (first.scripted, first.cost_usd, first.provider, first.cached_input_tokens) == (True, 0, "scripted", 0)
    assert first.input_tokens == (len(SYSTEM) + len(ASK[0].content)) // 4
    assert first.output_tokens == len(first.text) // 4
    with pytest.raises(ProviderExhausted, match="2 scripted replies .* are used up"):
        provider.complete(SYSTEM, ASK)


def test_a_scripted_jsonl_file_replies_line_by_line(tmp_path):
    replies = tmp_path / "replies.jsonl"
    replies.write_text(json.dumps({"reply": "one"}) + "\n\n" + json.dumps({"reply": "two", "note": "x"}) + "\n")
    provider = make_provider(parse_spec(f"scripted:{replies}"))
    assert [provider.complete(SYSTEM, ASK).text for _ in range(2)] == ["one", "two"]
    with pytest.raises(ProviderExhausted):
        provider.complete(SYSTEM, ASK)


@pytest.mark.parametrize("content, message", [
    ('{"reply": "fine"}\n{"text": "no reply field"}\n', "line 2 of .* is not a JSON object"),
    ("not json\n", "line 1 of"),
    ("", "hold no reply"),
])
def test_a_bad_jsonl_file_is_refused_when_loaded(tmp_path, content, message):
    replies = tmp_path / "replies.jsonl"
    replies.write_text(content)
    with pytest.raises(ProviderError, match=message):
        make_provider(parse_spec(f"scripted:{replies}"))


def test_missing_or_empty_scripted_replies_are_refused(tmp_path):
    with pytest.raises(ProviderError, match="do not exist; pass a directory of candidate .py files"):
        make_provider(parse_spec(f"scripted:{tmp_path / 'nowhere'}"))
    with pytest.raises(ProviderError, match="hold no reply"):
        make_provider(parse_spec(f"scripted:{tmp_path}"))


# ---- a mix of providers -----------------------------------------------------------------------

class Named:
    """A stand-in Provider (not an SDK) that answers with its own name, to count who was asked."""

    def __init__(self, name: str, weight: float):
        self.spec = LLMSpec(kind="scripted", model=name, path=Path(name), weight=weight)

    def complete(self, system, messages):
        return Completion(text=self.spec.model, provider="scripted", model=self.spec.model, input_tokens=0,
                          output_tokens=0, cached_input_tokens=0, cost_usd=0, latency_s=0, scripted=True,
                          finish_reason="stop")


def answers(mix: ProviderMix, calls: int) -> list[str]:
    return [mix.complete(SYSTEM, ASK).model for _ in range(calls)]


def test_a_mix_follows_its_weights_and_repeats_with_its_seed():
    def mix(seed):
        return ProviderMix([Named("heavy", 3), Named("light", 1)], seed=seed)
    drawn = answers(mix(7), 4000)
    assert 0.72 < drawn.count("heavy") / len(drawn) < 0.78
    assert answers(mix(7), 200) == drawn[:200]
    assert answers(mix(8), 200) != drawn[:200]


def test_a_mix_is_built_from_specs(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for index in range(20):
            (tmp_path / name / f"{index:02}.py").write_text(f"# from {name}\n")
    specs = [parse_spec(f"scripted:{tmp_path / 'a'}*4"), parse_spec(f"scripted:{tmp_path / 'b'}")]
    drawn = answers(ProviderMix.from_specs(specs, seed=1), 20)
    assert set(drawn) == {"a", "b"} and drawn.count("a") > drawn.count("b")
    with pytest.raises(ProviderError, match="no LLM provider was given"):
        ProviderMix([])


# ---- defaults from the environment ------------------------------------------------------------

def test_defaults_follow_the_keys_that_are_set(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "a")
    assert default_specs_from_environment() == [LLMSpec(kind="anthropic", model=DEFAULT_ANTHROPIC_MODEL)]
    monkeypatch.setenv("OPENAI_API_KEY", "o")
    assert [spec.kind for spec in default_specs_from_environment()] == ["anthropic", "openai"]
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    assert default_specs_from_environment() == [LLMSpec(kind="openai", model=DEFAULT_OPENAI_MODEL)]


def test_a_base_url_without_a_key_means_the_model_that_server_serves(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1")
    assert default_specs_from_environment() == [
        LLMSpec(kind="openai-compatible", model="served-model", base_url=f"{server.url}/v1")]
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    with pytest.raises(ProviderError, match="could not list the models served at http://127.0.0.1:9/v1"):
        default_specs_from_environment()


def test_no_configuration_names_every_option():
    with pytest.raises(ProviderError) as caught:
        default_specs_from_environment()
    for option in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "openai-compatible:MODEL@URL",
                   "scripted:examples/scripted/"):
        assert option in str(caught.value)
