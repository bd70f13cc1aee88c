"""`FastTransport`: a lean keep-alive connection pool on asyncio protocols, for plain http://
servers: the hot path, where one model server answers thousands of requests in flight and a
general-purpose HTTP library costs more CPU than the requests themselves. It speaks what model
servers answer with: Content-Length bodies, chunked bodies (SSE streams), bodies that end with
the connection, keep-alive, `Connection: close`, 1xx interim responses. It never pipelines: one
request at a time per connection."""

import asyncio
from collections.abc import AsyncIterator

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
                _, conn = await loop.create_connection(_Connection, self.host, self.port)
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


_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)


class _Connection(asyncio.Protocol):
    """One TCP connection and the parser of the response to the request in flight on it."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.tr = None
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
        self._reset()

    def _reset(self) -> None:
        self.state = _HEAD
        self.buf = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.parts: list[bytes] = []
        self.remaining = 0
        self.chunk = -1  # bytes left in the current chunk; -1 size line next, -2 trailers
        self.got_bytes = False

    # -- requests --

    def usable(self) -> bool:
        return not self.closed and self.finished and not self.tr.is_closing()

    def start(self, data: bytes, method: str, timeout: float | None, stream: bool) -> asyncio.Future:
        self._reset()
        self.method = method
        self.stream = stream
        self.queue = asyncio.Queue() if stream else None
        self.finished = False
        self.keep_alive = True
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
        if self.finished:
            return
        if self.state == _UNTIL_CLOSE:
            self._finish()
        elif was_closed:
            self._fail(TransportError("connection closed"))
        elif not self.got_bytes and self.requests > 1:
            self._fail(_StaleConnection("keep-alive connection closed by the server"))
        else:
            reason = f": {exc}" if exc else ""
            self._fail(TransportError(f"the server closed the connection before a complete response{reason}"))

    def data_received(self, data: bytes) -> None:
        if self.finished:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        self.got_bytes = True
        if self.stream and self.timer is not None and self.state != _HEAD:
            self.timer.cancel()  # streaming: the timeout is the longest silence, not the whole stream
            self.timer = self.loop.call_later(self.timeout, self._on_timeout)
        try:
            if self.state == _HEAD:
                data = self._read_head(data)
                if not data or self.finished:
                    return
            if self.state == _LENGTH:
                self._read_length(data)
            elif self.state == _CHUNKED:
                self._read_chunked(data)
            else:
                self._emit(data)
        except (ValueError, IndexError) as e:
            self._fail(TransportError(f"malformed HTTP response: {e}"))
            self.close()

    # -- parsing --

    def _read_head(self, data: bytes) -> bytes:
        """Consume the status line and headers; return what follows them."""
        while True:
            if self.buf:
                data = self.buf + data
                self.buf = b""
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD_BYTES:
                    raise ValueError("response headers larger than 64 KiB")
                self.buf = data
                return b""
            lines = data[:end].split(b"\r\n")
            data = data[end + 4 :]
            status_line = lines[0]
            if not status_line.startswith(b"HTTP/1."):
                raise ValueError(f"not an HTTP/1.x status line: {status_line[:40]!r}")
            status = int(status_line[9:12])
            if status < 200:
                continue  # 100 Continue, 103 Early Hints: the real response follows
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if sep:
                    headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
            self.status = status
            self.headers = headers
            connection = headers.get("connection", "").lower()
            if status_line[7:8] == b"0":  # HTTP/1.0 closes unless asked to keep alive
                self.keep_alive = "keep-alive" in connection
            else:
                self.keep_alive = "close" not in connection
            if self.stream:
                self.fut.set_result((status, headers))
            if self.method == "HEAD" or status in (204, 304):
                self._finish()
            elif "chunked" in headers.get("transfer-encoding", "").lower():
                self.state = _CHUNKED
            elif "content-length" in headers:
                self.remaining = int(headers["content-length"])
                self.state = _LENGTH
                if self.remaining == 0:
                    self._finish()
            else:
                self.state = _UNTIL_CLOSE
                self.keep_alive = False
            return data

    def _read_length(self, data: bytes) -> None:
        n = len(data)
        if n >= self.remaining:
            if n > self.remaining:  # more than announced: answer with what was announced, then drop
                data = data[: self.remaining]
                self.keep_alive = False
            self._emit(data)
            self._finish()
        else:
            self.remaining -= n
            self._emit(data)

    def _read_chunked(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        while True:
            if self.chunk < 0:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_HEAD_BYTES:
                        raise ValueError("chunk header larger than 64 KiB")
                    break
                line = buf[pos:end]
                pos = end + 2
                if self.chunk == -2:  # trailers end with an empty line
                    if not line:
                        self.buf = b""
                        if pos < len(buf):
                            self.keep_alive = False
                        self._finish()
                        return
                    continue
                size = int(line.split(b";", 1)[0].strip(), 16)
                self.chunk = size if size else -2
            else:
                if len(buf) - pos < self.chunk + 2:
                    break
                end = pos + self.chunk
                if buf[end : end + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                self._emit(buf[pos:end])
                pos = end + 2
                self.chunk = -1
        self.buf = buf[pos:]

    def _emit(self, piece: bytes) -> None:
        if not piece:
            return
        if self.stream:
            self.queue.put_nowait(piece)
        else:
            self.parts.append(piece)

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
