"""What every transport is: the `Transport` interface the clients use, its `Response`, and the
one error a transport raises (besides `TimeoutError`)."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


class TransportError(Exception):
    """The connection failed before a complete response arrived (worth retrying)."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated field's values joined with ", "
    body: bytes


class Stream(Protocol):
    """A response read as it comes: `async with transport.stream(...) as s`, then s.status,
    s.headers (as Response's), `async for piece in s` or `await s.read()`."""

    status: int
    headers: dict[str, str]

    async def __aenter__(self) -> "Stream": ...
    async def __aexit__(self, *exc) -> None: ...
    def __aiter__(self) -> AsyncIterator[bytes]: ...
    async def read(self) -> bytes: ...


class Transport(Protocol):
    """HTTP/1.1 requests to one server: what the clients and the job's server watch use. Raises
    TransportError (refused, reset, dropped mid-response, malformed HTTP) or TimeoutError; never
    puts the request headers (the API key) in an exception."""

    async def request(self, method: str, path: str, body: bytes | None, timeout: float | None) -> Response: ...
    def stream(self, method: str, path: str, body: bytes | None, timeout: float | None) -> Stream: ...
    async def close(self) -> None: ...
