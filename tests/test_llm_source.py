"""The ``llm`` concept source against a real chat-completions server on 127.0.0.1."""

import json
import logging
import time

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from chat_server import ChatServer, free_port
from t2vu.concept_sources.llm import LLMSourceOptions
from t2vu.concept_sources.llm_client import ContentError, LLMSource, parse_list
from t2vu.core.cli import app
from t2vu.core.errors import T2VUError

KEY = "sk-test-4f9a8b7c6d5e-secret"
GOOD = json.dumps({"synonyms": ["nakedness", "nude"],
                   "concepts": ["clothing", "Nakedness", "a person in a swimsuit", "partial nudity",
                                "Clothing", "a beach", "nudity", "a painting of a person", "a dog"]})
runner = CliRunner()


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("T2VU_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("T2VU_TEST_LLM_KEY", KEY)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def source(server, **options):
    base = dict(base_url=server.url if server else "http://127.0.0.1:9/v1", model="qwen",
                api_key_env="T2VU_TEST_LLM_KEY", timeout=5, retries=0, retry_backoff=0)
    return LLMSource(LLMSourceOptions(**{**base, **options}))


def test_concepts_validated_deduplicated_without_target_or_synonyms():
    with ChatServer([GOOD]) as server:
        found = source(server, count=4).concepts("nudity")
        assert found == ["clothing", "a person in a swimsuit", "a beach", "a painting of a person"]
        assert server.calls == 1
        request = server.requests[0]
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["authorization"] == f"Bearer {KEY}"
        body = request["body"]
        assert body["model"] == "qwen" and body["temperature"] == 0
        assert "nudity" in body["messages"][-1]["content"] and "JSON" in body["messages"][-1]["content"]
        assert "response_format" not in body
        source(server, json_mode=True, cache=False).concepts("nudity")
        assert server.requests[-1]["body"]["response_format"] == {"type": "json_object"}


def test_reply_cached_by_request_so_reruns_are_free_and_identical(tmp_path):
    with ChatServer([GOOD, json.dumps({"concepts": ["something else"]})]) as server:
        first = source(server).concepts("nudity")
        again = source(server).concepts("nudity")
        assert again == first and server.calls == 1  # from the cache
        files = list((tmp_path / "cache" / "llm").glob("*.json"))
        assert len(files) == 1
        assert KEY not in files[0].read_text() and "T2VU_TEST_LLM_KEY" not in files[0].read_text()
        assert source(server, count=3).concepts("nudity") == ["something else"]  # another request
        assert server.calls == 2
        source(server, cache=False).concepts("nudity")
        assert server.calls == 3
        custom = tmp_path / "mine"
        source(server, cache_dir=custom).concepts("nudity")
        assert len(list(custom.glob("*.json"))) == 1


@pytest.mark.parametrize("content, expected", [
    ('```json\n{"concepts": ["clothing", "a beach"]}\n```', ["clothing", "a beach"]),
    ('Sure! Here they are:\n["clothing", "a beach"]\nHope this helps.', ["clothing", "a beach"]),
    ("1. **Clothing** - people wearing clothes\n2) A beach: sand and sea\n3. \"swimsuit\"",
     ["Clothing", "A beach", "swimsuit"]),
    ("- clothing\n* a beach\n\u2022 swimsuit.", ["clothing", "a beach", "swimsuit"]),
    ('[{"name": "clothing"}, {"concept": "a beach"}]', ["clothing", "a beach"]),
    ('{"related": ["clothing", "clothing ", "CLOTHING", "a beach"]}', ["clothing", "a beach"]),
])
def test_parse_list_tolerates_common_deviations(content, expected):
    assert parse_list(content)[0] == expected


@pytest.mark.parametrize("content", ["", "   ", "I cannot help with that.", '{"concepts": []}',
                                     '{"answer": "none"}', "[1, 2, 3]", '["' + "x" * 300 + '"]'])
def test_parse_list_rejects_unusable_replies(content):
    with pytest.raises(ContentError):
        parse_list(content)


def test_fenced_reply_through_the_server():
    fenced = "Here you go:\n```json\n" + GOOD + "\n```"
    with ChatServer([fenced]) as server:
        assert source(server, count=2).concepts("nudity") == ["clothing", "a person in a swimsuit"]


def test_slow_reply_times_out_then_retry_succeeds():
    with ChatServer([("slow", 1.5, GOOD), GOOD]) as server:
        start = time.monotonic()
        found = source(server, timeout=0.4, retries=1, count=1).concepts("nudity")
        assert found == ["clothing"] and server.calls == 2
        assert time.monotonic() - start < 1.4  # did not wait for the slow reply


def test_slow_every_time_is_a_clear_timeout_error():
    with ChatServer([("slow", 1.0, GOOD)]) as server:
        with pytest.raises(T2VUError, match=r"after 2 tries; last problem: no reply within 0.3 s"):
            source(server, timeout=0.3, retries=1).concepts("nudity")
        assert server.calls == 2


def test_server_error_is_retried_a_bounded_number_of_times():
    with ChatServer([("status", 500, "boom"), GOOD]) as server:
        assert source(server, retries=2, count=1).concepts("nudity") == ["clothing"]
        assert server.calls == 2
    with ChatServer([("status", 503, "overloaded")]) as server:
        with pytest.raises(T2VUError, match=r"after 3 tries; last problem: HTTP 503: overloaded"):
            source(server, retries=2).concepts("nudity")
        assert server.calls == 3


def test_malformed_content_is_retried_then_reported(tmp_path):
    with ChatServer(["Sorry, I can't list concepts.", GOOD]) as server:
        assert source(server, retries=1, count=1).concepts("nudity") == ["clothing"]
        assert server.calls == 2
    with ChatServer(["Sorry, I can't list concepts."]) as server:
        with pytest.raises(T2VUError, match="neither JSON nor a numbered list"):
            source(server, retries=1).concepts("nudity")
        assert server.calls == 2
    cached = [json.loads(p.read_text())["content"] for p in (tmp_path / "cache" / "llm").glob("*.json")]
    assert cached == [GOOD]  # only usable replies are cached


def test_not_a_chat_completion_and_client_errors_are_not_retried():
    with ChatServer([("raw", 200, b"<html>a web page</html>")]) as server:
        with pytest.raises(T2VUError, match="did not answer with a chat completion"):
            source(server, retries=3).concepts("nudity")
        assert server.calls == 1
    with ChatServer([("status", 404, "no such model")]) as server:
        with pytest.raises(T2VUError, match="HTTP 404: check base_url"):
            source(server, retries=3).concepts("nudity")
        assert server.calls == 1
    with ChatServer([("status", 400, "bad request")]) as server:
        with pytest.raises(T2VUError, match=r"rejected the request \(HTTP 400\): bad request"):
            source(server, retries=3).concepts("nudity")


def test_empty_results():
    only_target = json.dumps({"synonyms": ["nude"], "concepts": ["nudity", "Nude", "full nudity"]})
    with ChatServer([only_target]) as server:
        with pytest.raises(T2VUError, match="proposed no usable concepts for 'nudity'"):
            source(server).concepts("nudity")
    with ChatServer(['{"concepts": []}']) as server:
        with pytest.raises(T2VUError, match="no usable entries"):
            source(server).concepts("nudity")


def test_server_down():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(T2VUError, match=r"cannot reach the LLM server at http://127.0.0.1:\d+/v1 .*after 2 tries"):
        source(None, base_url=f"http://127.0.0.1:{port}/v1", retries=1).concepts("nudity")
    assert time.monotonic() - start < 5


def test_api_key_comes_from_the_named_variable_and_never_leaks(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("T2VU_TEST_LLM_KEY")
    with pytest.raises(T2VUError, match="environment variable T2VU_TEST_LLM_KEY .* is not set"):
        source(None)
    with pytest.raises(ValidationError, match="never put the key itself in the spec"):
        LLMSourceOptions(model="m", api_key_env=KEY)
    monkeypatch.setenv("T2VU_TEST_LLM_KEY", KEY)
    with ChatServer([("status", 401, f"invalid key {KEY}")]) as server:
        with pytest.raises(T2VUError) as exc:
            source(server).concepts("nudity")
    assert "HTTP 401" in str(exc.value) and "***" in str(exc.value) and KEY not in str(exc.value)
    with ChatServer([GOOD]) as server:
        src = source(server)
        src.concepts("nudity")
        assert KEY not in repr(src.options.model_dump()) and KEY not in caplog.text
    with ChatServer([GOOD]) as server:  # keyless servers: api_key_env: null
        source(server, api_key_env=None, cache=False).concepts("nudity")
        assert KEY not in server.requests[0]["headers"].get("authorization", "")


def test_concepts_command_with_llm(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    with ChatServer([GOOD]) as server:
        args = ["concepts", "nudity", "--source", "llm", "--count", "3", "--set", f"base_url={server.url}",
                "--set", "model=qwen", "--set", "api_key_env=MY_KEY", "--json"]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout) == ["clothing", "a person in a swimsuit", "a beach"]
        assert KEY not in r.output
        assert server.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
    r = runner.invoke(app, args[:-1] + ["--set", "retries=0"])  # the server is gone now; served from cache
    assert r.exit_code == 0 and r.stdout.splitlines() == ["clothing", "a person in a swimsuit", "a beach"]
    r = runner.invoke(app, args + ["--set", "retries=0", "--set", "cache=false"])
    assert r.exit_code == 1 and "cannot reach the LLM server" in r.output
    monkeypatch.delenv("MY_KEY")
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "MY_KEY (api_key_env) is not set" in r.output
    r = runner.invoke(app, ["concepts", "x", "--source", "llm", "--set", f"api_key_env={KEY}", "--set", "model=m"])
    assert r.exit_code == 2 and KEY not in r.output.replace("\n", "")


def test_cli_error_keeps_brackets_from_the_reply():
    with ChatServer(["[clothing, beach] is my answer"]) as server:
        r = runner.invoke(app, ["concepts", "nudity", "--source", "llm", "--set", f"base_url={server.url}",
                                "--set", "model=m", "--set", "api_key_env=null", "--set", "retries=0"])
    assert r.exit_code == 1 and "'[clothing, beach] is my answer'" in r.output
