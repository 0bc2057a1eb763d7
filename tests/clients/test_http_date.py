"""RFC 9110 6.6.1: an origin server with a clock sends `Date` on every answer.
tiny_http adds it to REST answers; these tests cover the answers the server
writes itself, read from raw sockets and parsed with Python's own HTTP-date
parser: the WebSocket `101`, the `503` refusal at MAX_CONNECTIONS, the request
pump's `4xx`, the dispatcher's `414`, and the handshake's `400`, `401` and
`403`. Each must carry a `Date` in the IMF-fixdate form, close to now."""

import base64
import os
import re
import socket
import time
from email.utils import parsedate_to_datetime

from clientlib import raw_http, wait_until

IMF_FIXDATE = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT$"
)
CLOCK_SLACK_S = 120


def assert_dated(what, headers):
    date = headers.get("date")
    assert date is not None, f"{what}: no Date header in {headers}"
    assert IMF_FIXDATE.match(date), f"{what}: Date {date!r} is not an IMF-fixdate"
    when = parsedate_to_datetime(date).timestamp()
    assert abs(when - time.time()) < CLOCK_SLACK_S, f"{what}: Date {date!r} is far from now"


def upgrade_request(path="/ws", extra=b"", key=True):
    lines = [
        f"GET {path} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Version: 13",
    ]
    if key:
        lines.append(b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)))
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


def head_of(host, port, request):
    """Sends `request` and reads only the answer's head (a 101 has no body
    and the connection stays open): (status, {lower-case name: value})."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in data:
            assert time.monotonic() < deadline, f"no answer head: {data!r}"
            chunk = sock.recv(4096)
            assert chunk, f"closed before an answer head: {data!r}"
            data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers


def test_the_websocket_upgrade_is_dated(start_server):
    server = start_server()
    status, headers = head_of(server.host, server.port, upgrade_request())
    assert status == 101, headers
    assert_dated("101 Switching Protocols", headers)


def test_handshake_refusals_are_dated(start_server):
    server = start_server(API_KEY="k3y", CORS_ORIGINS="https://app.example")
    cases = [
        ("400 without Sec-WebSocket-Key", upgrade_request(key=False), 400),
        ("401 without the key", upgrade_request(), 401),
        (
            "403 from another origin",
            upgrade_request("/ws?api_key=k3y", b"Origin: https://evil.example\r\n"),
            403,
        ),
    ]
    for what, request, expected in cases:
        status, headers, body = raw_http(server.host, server.port, request)
        assert status == expected, (what, status, body)
        assert b'"error"' in body, (what, body)
        assert_dated(what, headers)


def test_answers_before_tiny_http_are_dated(start_server):
    server = start_server()
    cases = [
        (
            "414 request line too long",
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
        ),
        (
            "400 ambiguous framing",
            b"POST /topics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "431 head too large",
            b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 20000 + b"\r\n\r\n",
            431,
        ),
        ("505 another HTTP version", b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (
            "413 body over MAX_MESSAGE_BYTES",
            b"POST /topics HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
            413,
        ),
    ]
    for what, request, expected in cases:
        status, headers, body = raw_http(server.host, server.port, request)
        assert status == expected, (what, status, body)
        assert_dated(what, headers)
    # And what tiny_http answers, for comparison.
    status, headers, _ = raw_http(
        server.host, server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    assert_dated("200 from tiny_http", headers)


def test_the_refusal_at_max_connections_is_dated(start_server):
    server = start_server(MAX_CONNECTIONS=1)
    # A WebSocket session holds the one place (a connection still waiting for
    # its request head would be evicted to make room instead).
    with socket.create_connection((server.host, server.port), timeout=10) as held:
        held.sendall(upgrade_request())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = held.recv(4096)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 101"), data

        def refused():
            status, headers, body = raw_http(
                server.host, server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            return (status, headers, body) if status == 503 else None

        status, headers, body = wait_until(refused, 10, "a 503 at MAX_CONNECTIONS=1")
        assert b"MAX_CONNECTIONS" in body, body
        assert_dated("503 at MAX_CONNECTIONS", headers)


def test_a_session_is_never_evicted_as_a_connection_waiting_for_its_head(start_server):
    """At MAX_CONNECTIONS the connection that has waited longest for a request
    head makes room for a new one. A WebSocket stops waiting the moment its
    upgrade is accepted, before the 101 is sent: a request right after the 101
    must be refused, never served by evicting the session it came after."""
    server = start_server(MAX_CONNECTIONS=1)
    probe = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    def upgraded():
        """A socket whose upgrade was accepted; None while the place is still taken (by the
        last probe, whose connection may not have ended on the server's side yet)."""
        sock = socket.create_connection((server.host, server.port), timeout=10)
        sock.sendall(upgrade_request())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"HTTP/1.1 101"):
            return sock
        sock.close()
        assert data.startswith(b"HTTP/1.1 503"), data
        return None

    for attempt in range(50):
        held = wait_until(upgraded, 10, "an accepted upgrade")
        with held:
            status, _, _ = raw_http(server.host, server.port, probe)
            assert status == 503, f"attempt {attempt}: the session was evicted ({status})"
