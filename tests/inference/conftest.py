"""The fault-injecting stub server, one per test module, reset before each test, in strict mode:
every request a servegen client sends it is validated against the documented request schema of
the engine that client is for (tests/inference/schemas/), and a test after which the stub
recorded a body that does not match fails, even if the test expected (or soft-failed) the
error, unless it says it expects them (`stub.expect_schema_errors = True`)."""

import collections
import contextvars
import json

import pytest
from stub_server import SERVER_TYPE_HEADER, StubServer, prompt_keys


@pytest.fixture(scope="module")
def stub_server():
    server = StubServer().start()
    yield server
    server.stop()


@pytest.fixture
def stub(stub_server, monkeypatch):
    s = stub_server
    s.mode, s.fail_first, s.fault_rate, s.retry_after, s.stall_s, s.delay_s = "ok", 0, 0.3, "0", 5.0, 0.0
    s.seed = 0
    s.models_status = 200
    s.token_ids = True
    s.replies.clear()
    s.keep_bodies = True
    s.reset()
    s.strict = "auto"
    s.schema_errors.clear()
    s.expect_schema_errors = False
    name_the_server_type(monkeypatch, s.base_url)
    yield s
    s.release()  # nothing stays held after a test
    if s.schema_errors and not s.expect_schema_errors:
        pytest.fail("request bodies that do not match their engine's schema:\n" + "\n".join(s.schema_errors))


def name_the_server_type(monkeypatch, base_url: str) -> None:
    """Every servegen client made for `base_url` sends its server type in the X-Stub-Server-Type
    header, which tells the strict stub whose schema to check each of its requests against. (The
    header goes with the headers a client's transport sends on every request: wrapped around
    Client._state, where the transport is made.)"""
    from servegen.inference import client as client_module

    making: contextvars.ContextVar = contextvars.ContextVar("making", default=None)
    original_state = client_module.Client._state
    original_make_transport = client_module.make_transport

    def _state(self):
        token = making.set(self)
        try:
            return original_state(self)
        finally:
            making.reset(token)

    def make_transport(url, headers, *args, **kwargs):
        client = making.get()
        if client is not None and url.startswith(base_url):
            headers = {**headers, SERVER_TYPE_HEADER: client.server_type}
        return original_make_transport(url, headers, *args, **kwargs)

    monkeypatch.setattr(client_module.Client, "_state", _state)
    monkeypatch.setattr(client_module, "make_transport", make_transport)


@pytest.fixture
def client_timeouts(monkeypatch) -> collections.Counter:
    """Per prompt key, how many of the client's requests for it ran past their timeout. Such a
    request may still have been answered by the stub (after the client gave up), so a prompt
    retried after a timeout can rightly count two answers at the stub: tests that count answers
    exactly allow one more per timeout of that prompt's requests, and only that."""
    from servegen.inference import transport as http

    counts: collections.Counter = collections.Counter()
    for cls in (http.FastTransport, http.AiohttpTransport):

        async def request(self, method, path, body, timeout, _original=cls.request):
            try:
                return await _original(self, method, path, body, timeout)
            except TimeoutError:
                counts.update(prompt_keys(path, json.loads(body)))
                raise

        monkeypatch.setattr(cls, "request", request)
    return counts
