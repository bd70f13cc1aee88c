"""The stub model server the generation tests share (one per test module), reset for each test."""

import pytest

from job_helpers import JobStub


@pytest.fixture(scope="module")
def stub_server():
    server = JobStub().start()
    yield server
    server.stop()


@pytest.fixture
def stub(stub_server):
    s = stub_server
    s.mode, s.delay_s, s.keep_bodies = "ok", 0.0, True
    s.replies.clear()
    s.reset()
    return s
