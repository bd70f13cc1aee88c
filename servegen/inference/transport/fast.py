"""`FastTransport`: a lean keep-alive connection pool on asyncio protocols, for plain http://
servers: the hot path, where one model server answers thousands of requests in flight and a
general-purpose HTTP library costs more CPU than the requests themselves. Responses are parsed by
httptools (llhttp, the parser uvicorn uses); this module keeps the pool and what a request needs
around the parser. It speaks what model servers answer with: Content-Length bodies, chunked
bodies (SSE streams), bodies that end with the connection, keep-alive, `Connection: close`, 1xx
interim responses; a repeated header's values are joined with ", ". It never pipelines: one
request at a time per connection."""

import asyncio
from collections.abc import AsyncIterator

import httptools

from servegen.inference.transport.base import Response, TransportError

MAX_HEAD_BYTES = 64 * 1024  # status line + headers; more is not an HTTP server we can talk to


class _StaleConnection(TransportError):
    """A reused keep-alive connection the server had already closed: nothing was answered."""


class FastTransport:
    """Keep-alive connections to one host:port, owned by the event loop that first uses it."""

    def __init__(self, host: str, port: int, headers: dict[str, str]):
        # no connection limit of its own: one request per connection, and the client's
        # semaphore bounds the requests in flight
        self.host = host
        self.port = port
        self._idle: list[_Connection] = []
        self._readers: list[_Reader] = []  # parsers between responses, lent to any connection
        self._heads: dict[tuple[str, str], bytes] = {}
        host_header = host if port == 80 else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]:{port}"  # IPv6 literal
        lines = [f"Host: {host_header}"] + [f"{k}: {v}" for k, v in headers.items()]
        self._common = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._closed = False

    def _head(self, method: str, path: str) -> bytes:
        key = (method, path)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = f"{method} {path} HTTP/1.1\r\n".encode("latin-1") + self._common
        return head

    async def _connect(self, timeout: float | None) -> "_Connection":
        loop = asyncio.get_running_loop()
        try:
            # not asyncio.wait_for: on Python 3.11 it loses a cancel that comes as the connection
            # attempt fails (it raises the failure instead), and the cancelled caller carries on
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self._readers), self.host, self.port)
        except asyncio.TimeoutError:
            raise TimeoutError(f"connecting to {self.host}:{self.port} took more than {timeout} s") from None
        except OSError as e:
            raise TransportError(f"cannot connect to {self.host}:{self.port}: {e.strerror or e}") from None
        return conn

    async def _send(self, method: str, path: str, body: bytes | None, timeout: float | None, stream: bool):
        if self._closed:
            raise TransportError("the client was closed")
        head = self._head(method, path)
        if body is not None:
            data = b"%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        else:
            data = head + b"\r\n"
        conn = None
        while self._idle:
            candidate = self._idle.pop()
            if candidate.usable():
                conn = candidate
                break
        if conn is None:
            conn = await self._connect(timeout)
        try:
            return conn, await conn.start(data, method, timeout, stream)
        except _StaleConnection:
            # closed by the server while idle (its keep-alive timeout), unanswered: once more on
            # a new connection, not another idle one, which is likely just as old
            conn = await self._connect(timeout)
        except BaseException:
            conn.close()  # cancelled or failed mid-response: its state is unknown
            raise
        try:
            return conn, await conn.start(data, method, timeout, stream)
        except BaseException:
            conn.close()
            raise

    async def request(self, method: str, path: str, body: bytes | None, timeout: float | None) -> Response:
        conn, response = await self._send(method, path, body, timeout, stream=False)
        self._release(conn)
        return response

    def stream(self, method: str, path: str, body: bytes | None, timeout: float | None) -> "_FastStream":
        return _FastStream(self, method, path, body, timeout)

    def _release(self, conn: "_Connection") -> None:
        if conn.keep_alive and conn.usable() and not self._closed:
            self._idle.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


class _FastStream:
    """`async with transport.stream(...) as response`: status and headers first, then the body
    piece by piece (`async for piece in response`) or whole (`await response.read()`)."""

    def __init__(self, owner: FastTransport, method: str, path: str, body: bytes | None, timeout: float | None):
        self._args = (method, path, body, timeout)
        self._owner = owner
        self._conn: _Connection | None = None
        self.status = 0
        self.headers: dict[str, str] = {}

    async def __aenter__(self) -> "_FastStream":
        method, path, body, timeout = self._args
        self._conn, (self.status, self.headers) = await self._owner._send(method, path, body, timeout, stream=True)
        return self

    async def __aexit__(self, *exc) -> None:
        conn = self._conn
        if conn.finished:  # the whole body was read: the connection can serve the next request
            self._owner._release(conn)
        else:
            conn.close()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        queue = self._conn.queue
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self])


class _Stop(Exception):
    """Raised from a parser callback to stop llhttp: the response is complete and the rest of the
    bytes, if any, are not for us, so the connection is dropped."""


class _Reader:
    """llhttp (httptools) and its callbacks, which fill in the response of the connection it is
    lent to. A parser is needed only while a response arrives, and llhttp resets itself after each
    one, so connections share a few (most responses come in one read): not one per connection,
    when thousands are open."""

    __slots__ = ("parser", "conn")

    def __init__(self):
        self.parser = httptools.HttpResponseParser(self)
        self.conn: _Connection | None = None

    def on_message_begin(self) -> None:
        conn = self.conn
        if conn.finished:  # more bytes than the response announced: it stands, the connection does not
            raise _Stop
        conn.headers = {}  # also drops a 1xx interim response's headers

    def on_header(self, name: bytes, value: bytes) -> None:
        conn = self.conn
        if conn.head_done:  # a trailer after a chunked body: not one of the response's headers
            return
        name = name.decode("latin-1").lower()
        value = value.rstrip().decode("latin-1")  # llhttp strips the whitespace before a value only
        headers = conn.headers
        # a repeated field is one list, joined as HTTP says (Set-Cookie too: nothing here reads cookies)
        headers[name] = f"{headers[name]}, {value}" if name in headers else value

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            return  # 100 Continue, 103 Early Hints: the real response follows
        conn = self.conn
        conn.status = status
        conn.head_done = True
        if conn.stream:
            conn.fut.set_result((status, conn.headers))
        if conn.method == "HEAD":
            conn._finish()
            raise _Stop  # llhttp, not told it was HEAD, would wait for the body the headers announce

    def on_body(self, body: bytes) -> None:
        conn = self.conn
        if conn.stream:
            conn.queue.put_nowait(body)
        else:
            conn.parts.append(body)

    def on_message_complete(self) -> None:
        conn = self.conn
        if conn.head_done:  # not a 1xx interim response
            conn.keep_alive = self.parser.should_keep_alive()
            conn._finish()


class _Connection(asyncio.Protocol):
    """One TCP connection and the state of the response to the request in flight on it."""

    def __init__(self, readers: list[_Reader]):
        self.loop = asyncio.get_running_loop()
        self.tr = None
        self.readers = readers  # the transport's idle parsers
        self.reader: _Reader | None = None  # the one reading this connection's response, if lent
        self.fut: asyncio.Future | None = None  # the response (or, streaming, its head)
        self.stream = False
        self.queue: asyncio.Queue | None = None  # body pieces when streaming
        self.timer = None
        self.timeout: float | None = None
        self.method = "GET"
        self.closed = False
        self.requests = 0
        self.keep_alive = True
        self.finished = True  # no response in progress
        self.head_done = False  # the final (not 1xx) response's headers are in
        self.head_bytes = 0  # bytes fed before the headers were complete
        self.got_bytes = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.parts: list[bytes] = []

    # -- requests --

    def usable(self) -> bool:
        return not self.closed and self.finished and not self.tr.is_closing()

    def start(self, data: bytes, method: str, timeout: float | None, stream: bool) -> asyncio.Future:
        self.method = method
        self.stream = stream
        self.queue = asyncio.Queue() if stream else None
        self.finished = False
        self.head_done = False
        self.head_bytes = 0
        self.got_bytes = False
        self.requests += 1
        self.fut = self.loop.create_future()
        self.timeout = timeout
        if timeout is not None:
            self.timer = self.loop.call_later(timeout, self._on_timeout)
        self.tr.write(data)
        return self.fut

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.tr.abort()
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timeout(self) -> None:
        self.timer = None
        self._fail(TimeoutError(f"no complete response within {self.timeout} s"))
        self.close()

    def _fail(self, exc: BaseException) -> None:
        self.finished = True
        self._cancel_timer()
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(exc)
        elif self.queue is not None:
            self.queue.put_nowait(exc)

    # -- asyncio.Protocol --

    def connection_made(self, transport) -> None:
        self.tr = transport

    def connection_lost(self, exc) -> None:
        was_closed, self.closed = self.closed, True
        self.reader = None  # mid-response: its parser is not at a boundary, so not lent again
        if self.finished:
            return
        if self.head_done and self._ends_with_connection():
            self._finish()
        elif was_closed:
            self._fail(TransportError("connection closed"))
        elif not self.got_bytes and self.requests > 1:
            self._fail(_StaleConnection("keep-alive connection closed by the server"))
        else:
            reason = f": {exc}" if exc else ""
            self._fail(TransportError(f"the server closed the connection before a complete response{reason}"))

    def _ends_with_connection(self) -> bool:
        """Whether the body has neither a length nor chunks: then it is all the bytes before the close."""
        headers = self.headers
        return "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "").lower()

    def data_received(self, data: bytes) -> None:
        if self.finished:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        self.got_bytes = True
        if self.stream and self.timer is not None and self.head_done:
            self.timer.cancel()  # streaming: the timeout is the longest silence, not the whole stream
            self.timer = self.loop.call_later(self.timeout, self._on_timeout)
        reader = self.reader
        if reader is None:
            reader = self.reader = self.readers.pop() if self.readers else _Reader()
            reader.conn = self
        try:
            reader.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:  # Upgrade: a 101 nobody asked for
            self.reader = None  # its parser stopped mid-message: not lent again
            self._malformed(f"{type(e).__name__}: {e}")
            return
        if self.finished:
            self.reader = None
            if self.keep_alive:  # llhttp is ready for the next response, whichever connection's
                reader.conn = None
                self.readers.append(reader)
        elif not self.head_done:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._malformed("response headers larger than 64 KiB")

    def _malformed(self, problem: str) -> None:
        if not self.finished:  # else the response was complete and only what followed it was wrong
            self._fail(TransportError(f"malformed HTTP response: {problem}"))
        self.close()

    def _finish(self) -> None:
        self.finished = True
        self._cancel_timer()
        if self.stream:
            self.queue.put_nowait(None)
        elif not self.fut.done():
            parts = self.parts
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            self.fut.set_result(Response(self.status, self.headers, body))
        self.parts = []
