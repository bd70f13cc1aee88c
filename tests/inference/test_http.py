"""The HTTP/1.1 layer against a raw socket server that answers byte by byte as told: split
packets, chunked bodies with extensions and trailers, bodies that end with the connection,
interim 100 responses, Connection: close, keep-alive reuse, connections the server closes while
idle, big bodies, repeated headers, HEAD, garbage. Both transports (servegen's own and aiohttp)
must read them the same."""

import asyncio
import json
import socket
import threading
import time

import pytest

from servegen.inference import RetriesExhausted, get_model
from servegen.inference.transport import FastTransport, TransportError, connects, make_transport

BODY = json.dumps({"choices": [{"text": "ok", "finish_reason": "stop"}], "usage": {"completion_tokens": 1}}).encode()


def head(extra: str = "", length: int | None = len(BODY), version: str = "1.1") -> bytes:
    lines = [f"HTTP/{version} 200 OK", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawServer:
    """Answers each request with the actions `script(connection_index, request_index)` returns:
    bytes to send, a float to sleep, or "close"."""

    def __init__(self, script):
        self.script = script
        self.connections = 0
        self.requests = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections - 1), daemon=True).start()

    def _serve(self, conn, index):
        buf, served = b"", 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                request_head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in request_head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                self.requests += 1
                for action in self.script(index, served):
                    if action == "close":
                        return
                    if isinstance(action, float):
                        time.sleep(action)
                    else:
                        conn.sendall(action)
                served += 1

    def close(self):
        self.sock.close()


def generate(server, transport, n=1, **kwargs):
    llm = get_model("vllm", base_url=server.base_url, model="m", transport=transport, retry_backoff=0.001, max_backoff=0.01, **kwargs)
    try:
        return [llm.generate([f"p{i}"])[0]["generation"] for i in range(n)]
    finally:
        llm.close()


TRANSPORTS = ["fast", "aiohttp"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_split_packets(transport):
    whole = head() + BODY
    pieces = [whole[:7], 0.02, whole[7:30], 0.02, whole[30:-5], 0.02, whole[-5:]]
    server = RawServer(lambda c, r: pieces)
    assert generate(server, transport) == ["ok"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_chunked_with_extensions_and_trailers(transport):
    a, b = BODY[:10], BODY[10:]
    chunked = (
        head("Transfer-Encoding: chunked", length=None)
        + b"%x;name=value\r\n%s\r\n" % (len(a), a)
        + b"%X\r\n%s\r\n" % (len(b), b)
        + b"0\r\nX-Trailer: yes\r\n\r\n"
    )
    server = RawServer(lambda c, r: [chunked[:50], 0.02, chunked[50:]])
    assert generate(server, transport, n=3) == ["ok"] * 3
    assert server.connections == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_body_until_close(transport):
    server = RawServer(lambda c, r: [head(length=None, version="1.0"), BODY[:20], 0.02, BODY[20:], "close"])
    assert generate(server, transport, n=3) == ["ok"] * 3
    assert server.connections == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_interim_100_response(transport):
    server = RawServer(lambda c, r: [b"HTTP/1.1 100 Continue\r\n\r\n", 0.02, head() + BODY])
    assert generate(server, transport, n=2) == ["ok"] * 2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_close_and_keep_alive(transport):
    closing = RawServer(lambda c, r: [head("Connection: close") + BODY, "close"])
    assert generate(closing, transport, n=5) == ["ok"] * 5
    assert closing.connections == 5
    keeping = RawServer(lambda c, r: [head() + BODY])
    assert generate(keeping, transport, n=20) == ["ok"] * 20
    assert keeping.connections == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connections_closed_while_idle_are_replaced(transport):
    """The server closes each connection after answering, without saying so (as a keep-alive
    timeout does): the next request must not fail, and the server sees each request once."""
    server = RawServer(lambda c, r: [head() + BODY, 0.05, "close"])
    llm = get_model("vllm", base_url=server.base_url, model="m", transport=transport, max_retries=0)
    for i in range(10):
        assert llm.generate([f"p{i}"])[0]["generation"] == "ok"
        time.sleep(0.1)  # the close has happened by the next request
    llm.close()
    assert server.requests == 10


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_big_body(transport):
    text = "x" * 2_000_000
    big = json.dumps({"choices": [{"text": text, "finish_reason": "length"}], "usage": {"completion_tokens": 9}}).encode()
    pieces = [head(length=len(big))] + [big[i : i + 65536] for i in range(0, len(big), 65536)]
    server = RawServer(lambda c, r: pieces)
    assert generate(server, transport) == [text]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_garbage_is_an_error_after_retries(transport):
    server = RawServer(lambda c, r: [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "close"])
    with pytest.raises(RetriesExhausted, match="failed 3 times"):
        generate(server, transport, max_retries=2)
    assert server.requests == 3


@pytest.mark.parametrize("extra", [b"EXTRA", b"HTTP/1.1 2"])
def test_more_bytes_than_announced_are_dropped_with_the_connection(extra):
    server = RawServer(lambda c, r: [head() + BODY + extra])
    assert generate(server, "fast", n=3) == ["ok"] * 3
    assert server.connections == 3


def call(server, transport, *requests):
    """(status, headers, body) of each (method, stream?) in turn, on one transport."""

    async def run():
        t = make_transport(server.base_url, {}, 8, force=transport)
        answers = []
        try:
            for method, stream in requests:
                if stream:
                    async with t.stream(method, "/v1/completions", b"{}", 10.0) as s:
                        answers.append((s.status, s.headers, await s.read()))
                else:
                    r = await t.request(method, "/v1/completions", None if method == "HEAD" else b"{}", 10.0)
                    answers.append((r.status, r.headers, r.body))
        finally:
            await t.close()
        return answers

    return asyncio.run(run())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_repeated_header_is_its_values_joined_not_the_last_one(transport):
    """HTTP: a field repeated is one comma-separated list (trailers stay out of the headers)."""
    fields = "Warning: 199 - one\r\nX-Other: a  \r\nwarning: 199 - two\r\nTransfer-Encoding: chunked"
    chunked = head(fields, length=None) + b"%x\r\n%s\r\n0\r\nWarning: 199 - trailer\r\n\r\n" % (len(BODY), BODY)
    server = RawServer(lambda c, r: [chunked])
    for status, headers, body in call(server, transport, ("POST", False), ("POST", True)):
        assert (status, body) == (200, BODY)
        assert headers["warning"] == "199 - one, 199 - two"
        assert headers["x-other"] == "a"
        assert headers["transfer-encoding"] == "chunked"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_head_has_no_body_whatever_its_length_says(transport):
    server = RawServer(lambda c, r: [head()] if server.requests == 1 else [head() + BODY])
    answers = call(server, transport, ("HEAD", False), ("POST", False))
    assert [(status, body) for status, _, body in answers] == [(200, b""), (200, BODY)]
    assert answers[0][1]["content-length"] == str(len(BODY))


def test_many_responses_split_across_reads_at_once_each_keep_their_parser():
    """FastTransport lends parsers to connections while a response arrives: responses half read
    on 16 connections at once must not mix."""

    def script(c, r):
        body = b'{"c": %d}' % c
        whole = head(f"X-Conn: {c}", length=len(body)) + body
        return [whole[:20], 0.02, whole[20:70], 0.02, whole[70:]]

    server = RawServer(script)

    async def run():
        t = make_transport(server.base_url, {}, 16, force="fast")
        try:
            return await asyncio.gather(*(t.request("POST", "/v1/completions", b"{}", 10.0) for _ in range(16)))
        finally:
            await t.close()

    responses = asyncio.run(run())
    assert sorted(json.loads(r.body)["c"] for r in responses) == list(range(16))
    assert all(json.loads(r.body)["c"] == int(r.headers["x-conn"]) for r in responses)


def test_headers_that_never_end_are_an_error():
    endless = head("X-Big: " + "x" * 80_000)[:-4]  # no blank line after the headers
    server = RawServer(lambda c, r: [p for i in range(0, len(endless), 8192) for p in (endless[i : i + 8192], 0.005)] + [3.0])
    with pytest.raises(TransportError, match="larger than 64 KiB"):
        call(server, "fast", ("POST", False))


def test_connects_tells_a_listening_port_from_a_closed_one_and_leaves_proxied_addresses_to_requests(monkeypatch):
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert connects(f"http://127.0.0.1:{port}/v1")
    assert not connects(f"http://127.0.0.1:{port}", retry_for_s=0)  # closed now
    assert not connects("https://servegen-test.invalid/v1", retry_for_s=0)  # no such host
    # through a proxy a TCP connection to the host tells nothing: only a request can
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    assert connects("https://servegen-test.invalid/v1")
    assert not connects("http://servegen-test.invalid/v1", retry_for_s=0)  # http is not proxied here
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    assert connects("http://servegen-test.invalid/v1")
    assert not connects(f"http://127.0.0.1:{port}", retry_for_s=0)  # loopback never goes through a proxy


def test_connects_tries_again_for_a_while_before_it_says_nothing_answers():
    """A server between two listens (or one reset connection) is not a server gone."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        timer = threading.Timer(1.5, s.listen)  # refused for 1.5 s, then listening
        timer.start()
        started = time.monotonic()
        try:
            assert connects(f"http://127.0.0.1:{port}", retry_for_s=10)
        finally:
            timer.join()
        assert 1.5 <= time.monotonic() - started < 10
    started = time.monotonic()
    assert not connects(f"http://127.0.0.1:{port}", retry_for_s=1.0)  # nothing, ever: false after the time given
    assert 1.0 <= time.monotonic() - started < 5


def test_a_request_cancelled_as_its_connection_attempt_fails_ends_cancelled():
    """The cancel must win: a caller that got the connection error instead carries on as if
    not cancelled (a generation job then waited forever on its full result queue)."""

    async def attempt():
        loop = asyncio.get_running_loop()
        task = None

        async def refused(*args, **kwargs):
            connecting = loop.create_future()

            def fail_then_cancel():  # in one loop turn, before the caller resumes
                connecting.set_exception(ConnectionRefusedError(111, "Connection refused"))
                task.cancel()

            loop.call_soon(fail_then_cancel)
            await connecting

        loop.create_connection = refused
        task = asyncio.ensure_future(FastTransport("127.0.0.1", 9, {}).request("GET", "/v1/models", None, 30.0))
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(attempt())


def test_both_transports_have_the_transport_interface():
    import inspect

    from servegen.inference.transport import AiohttpTransport, Transport

    wanted = {name for name in Transport.__dict__ if not name.startswith("_")}
    assert wanted == {"request", "stream", "close"}
    for cls in (FastTransport, AiohttpTransport):
        for name in wanted:
            ours, theirs = inspect.signature(getattr(cls, name)), inspect.signature(getattr(Transport, name))
            assert list(ours.parameters)[: len(theirs.parameters)] == list(theirs.parameters), (cls, name)
