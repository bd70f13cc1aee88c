"""The stub model server the generation tests share (one per test module)."""

import pytest

from job_helpers import JobStub


@pytest.fixture(scope="module")
def stub_server():
    server = JobStub().start()
    yield server
    server.stop()
