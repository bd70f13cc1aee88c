"""`AiohttpTransport`: aiohttp, for what FastTransport does not do: https:// (TLS) and proxies
from the environment (http_proxy / https_proxy / no_proxy). aiohttp is imported only when used."""

import asyncio
from collections.abc import AsyncIterator

from servegen.inference.transport.base import Response, TransportError


class AiohttpTransport:
    """aiohttp for https:// and proxies (trust_env): the same interface as FastTransport."""

    def __init__(self, base_url: str, headers: dict[str, str], max_connections: int):
        self.base_url = base_url
        self.max_connections = max_connections
        self._headers = headers
        self._session = None

    def _get_session(self):
        import aiohttp

        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.max_connections)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers, trust_env=True)
        return self._session

    async def request(self, method: str, path: str, body: bytes | None, timeout: float | None) -> Response:
        async with self.stream(method, path, body, timeout, whole=True) as r:
            return Response(r.status, r.headers, await r.read())

    def stream(self, method: str, path: str, body: bytes | None, timeout: float | None, whole: bool = False):
        return _AiohttpStream(self, method, path, body, timeout, whole)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _AiohttpStream:
    def __init__(self, owner: AiohttpTransport, method, path, body, timeout, whole: bool):
        self._owner = owner
        self._args = (method, owner.base_url + path, body, timeout, whole)
        self._cm = None
        self._resp = None
        self.status = 0
        self.headers: dict[str, str] = {}

    async def __aenter__(self) -> "_AiohttpStream":
        import aiohttp

        method, url, body, timeout, whole = self._args
        # whole: the timeout bounds the entire response; streaming: the longest silence
        t = aiohttp.ClientTimeout(total=timeout) if whole else aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout)
        headers = {"Content-Type": "application/json"} if body is not None else None
        self._cm = self._owner._get_session().request(method, url, data=body, headers=headers, timeout=t)
        try:
            self._resp = await self._cm.__aenter__()
        except BaseException as e:
            raise _translate(e, timeout) from None
        self.status = self._resp.status
        for name, value in self._resp.headers.items():  # every field line, repeated ones too
            name = name.lower()
            self.headers[name] = f"{self.headers[name]}, {value}" if name in self.headers else value
        return self

    async def __aexit__(self, *exc) -> None:
        await self._cm.__aexit__(*exc)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._resp.content.iter_any():
                yield piece
        except BaseException as e:
            raise _translate(e, self._args[3]) from None

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except BaseException as e:
            raise _translate(e, self._args[3]) from None


def _translate(e: BaseException, timeout: float | None) -> BaseException:
    """aiohttp's exceptions as ours; their request info (headers: the key) stays behind."""
    import aiohttp

    if isinstance(e, asyncio.TimeoutError):
        return TimeoutError(f"no complete response within {timeout} s")
    if isinstance(e, aiohttp.ClientError):
        return TransportError(f"{type(e).__name__}: {e}")
    return e
