"""The API key is sent as a Bearer token and appears nowhere else: not in reprs, error messages,
tracebacks or logs, even when the server echoes it back."""

import logging
import traceback

import pytest

from servegen.inference import RequestRejected, Runner, get_model

KEY = "sk-servegen-test-3f9a1c7e"


@pytest.mark.parametrize("transport", ["fast", "aiohttp"])
def test_key_is_sent_but_never_shown(stub, caplog, transport):
    caplog.set_level(logging.DEBUG)
    stub.mode = "401"
    llm = get_model("openai", base_url=stub.base_url + "/v1", api_key=KEY, transport=transport)
    assert KEY not in repr(llm) and "***" in repr(llm)
    with pytest.raises(RequestRejected) as e:
        llm.generate(["hi"])
    assert stub.headers[-1]["Authorization"] == f"Bearer {KEY}"  # it was sent
    message = str(e.value)
    assert "HTTP 401" in message and "check api_key" in message and "***" in message  # the echo, masked
    shown = "".join(traceback.format_exception(e.value)) + repr(e.value) + caplog.text
    assert KEY not in shown
    stub.mode = "ok"
    assert llm.generate(["hi"])[0]["generation"] == "reply to hi"
    assert KEY not in caplog.text
    llm.close()


def test_key_from_the_environment(monkeypatch, stub):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("NVIDIA_API_KEY", raising=False)
    llm = get_model("openai", base_url=stub.base_url)
    llm.generate(["hi"])
    assert stub.headers[-1]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(llm) and KEY not in repr(Runner("openai", base_url=stub.base_url))
    assert KEY not in str(vars(llm))  # not even in a plain attribute
    llm.close()


def test_nvidia_hosts_prefer_nvidia_api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    monkeypatch.setenv("NVIDIA_API_KEY", "nvidia-key")
    nim = get_model("openai", base_url="https://integrate.api.nvidia.com/v1")
    other = get_model("openai", base_url="https://api.example.com/v1")
    assert nim._api_key.value == "nvidia-key"
    assert other._api_key.value == "openai-key"


def test_no_key_no_header(stub):
    with get_model("vllm", base_url=stub.base_url) as llm:
        llm.generate(["hi"])
    assert "Authorization" not in stub.headers[-1]
