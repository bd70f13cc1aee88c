"""The fault-injecting stub server, one per test module, reset before each test."""

import pytest
from stub_server import StubServer


@pytest.fixture(scope="module")
def stub_server():
    server = StubServer().start()
    yield server
    server.stop()


@pytest.fixture
def stub(stub_server):
    s = stub_server
    s.mode, s.fail_first, s.fault_rate, s.retry_after, s.stall_s, s.delay_s = "ok", 0, 0.3, "0", 5.0, 0.0
    s.models_status = 200
    s.token_ids = True
    s.replies.clear()
    s.keep_bodies = True
    s.reset()
    return s
