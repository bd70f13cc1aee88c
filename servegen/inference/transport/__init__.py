"""HTTP/1.1 for the clients: `make_transport` picks FastTransport (fast.py) for plain http://
without a proxy, else AiohttpTransport (aiohttp_client.py); both are a `Transport` (base.py).
`connects` says whether anything listens at an address."""

import ipaddress
import socket
import time
import urllib.parse
import urllib.request

from servegen.inference.transport.aiohttp_client import AiohttpTransport
from servegen.inference.transport.base import Response, Stream, Transport, TransportError
from servegen.inference.transport.fast import FastTransport

__all__ = ["AiohttpTransport", "FastTransport", "Response", "Stream", "Transport", "TransportError", "connects", "make_transport"]

CONNECT_RETRY_S = 10.0  # how long connects() keeps trying before it says nothing answers


def make_transport(base_url: str, headers: dict[str, str], max_connections: int, force: str | None = None) -> Transport:
    """FastTransport for http:// without a proxy, else AiohttpTransport. `force`: "fast" or "aiohttp"."""
    parts = urllib.parse.urlsplit(base_url)
    kind = force or ("aiohttp" if parts.scheme == "https" or _proxied(parts.hostname or "") else "fast")
    if kind == "fast":
        if parts.scheme != "http":
            raise ValueError(f"the fast transport speaks plain http only, not {parts.scheme}://")
        return FastTransport(parts.hostname, parts.port or 80, headers)
    return AiohttpTransport(base_url.rstrip("/"), headers, max_connections)


def connects(base_url: str, timeout_s: float = 5.0, retry_for_s: float = CONNECT_RETRY_S) -> bool:
    """Whether a TCP connection to base_url's host and port opens, trying again (after 0.25 s,
    0.5 s, 1 s, ...) for up to retry_for_s: one refused or reset connection is not a server gone.
    True for an address the environment sends through a proxy: only a request through the proxy
    can tell."""
    parts = urllib.parse.urlsplit(base_url)
    if _proxied(parts.hostname or "", parts.scheme):
        return True
    deadline = time.monotonic() + retry_for_s
    pause = 0.25
    while True:
        try:
            address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
            with socket.create_connection(address, timeout_s):
                return True
        except ValueError:  # not a host and port at all
            return False
        except OSError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause *= 2


def _proxied(host: str, scheme: str = "http") -> bool:
    """Whether the environment sends `scheme` requests to this host through a proxy."""
    if host == "localhost":
        return False
    try:
        if ipaddress.ip_address(host).is_loopback:
            return False  # a proxy for loopback is never what anyone means
    except ValueError:
        pass
    return scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host)
