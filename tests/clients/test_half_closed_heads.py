"""A client that sends part of a request and then half-closes its side
(shutdown(SHUT_WR)) can never finish that request: the server must answer it
400 at once and close, not hold the connection until HANDSHAKE_TIMEOUT_SEC.
The server runs with the default HANDSHAKE_TIMEOUT_SEC (10 s) so that an
answer within 1 s cannot be the time-out."""

import json
import random
import socket
import time

import pytest

ANSWER_WITHIN = 1.0  # seconds from the half-close to the server's close
READ_TIMEOUT = 2.0  # socket timeout of each read while waiting for EOF


def no_newline(data):
    return bytes(b for b in data if b not in (0x0A, 0x0D))


def tls_client_hello():
    """A TLS 1.2 ClientHello record, cut short (no line break anywhere)."""
    rng = random.Random(7)
    body = (
        b"\x03\x03"
        + no_newline(bytes(rng.randrange(256) for _ in range(40)))[:32].ljust(32, b"\x42")
        + b"\x00"  # no session id
        + b"\x00\x04\x13\x01\x13\x02"  # cipher suites
        + b"\x01\x00"  # compression: null
        + b"\x00\x0f\x00\x00\x00\x0b\x00\x09\x00\x00\x06server"  # SNI extension
    )
    handshake = b"\x01\x00" + len(body).to_bytes(2, "big") + body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


# Incomplete request lines: the server cannot route them, and after the
# half-close they can never be completed. Each must be answered 400.
INCOMPLETE_LINES = {
    "GET /health without CRLF": b"GET /health",
    "600 random bytes": no_newline(bytes(random.Random(1).randrange(256) for _ in range(700)))[:600],
    "G": b"G",
    "GET /t": b"GET /t",
    "DELETE /topics/": b"DELETE /topics/",
    "GET /topics HTTP/1.1 without CRLF": b"GET /topics HTTP/1.1",
    "TLS ClientHello": tls_client_hello(),
    "GET /ws": b"GET /ws",
}

# Complete request lines with the head cut short: the server may answer 400
# or just close, but must not wait for the time-out either.
INCOMPLETE_HEADS = {
    "600 random bytes with line breaks": b"\n".join(
        no_newline(bytes(random.Random(2).randrange(256) for _ in range(200))) for _ in range(3)
    ),
    "GET /health head without blank line": b"GET /health HTTP/1.1\r\nHost: x\r\n",
    "GET /ws head without blank line": b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
    "POST /topics body cut short": b"POST /topics HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n{\"na",
}


@pytest.fixture(scope="module")
def server():
    from clientlib import Server

    s = Server()  # HANDSHAKE_TIMEOUT_SEC left at its default, 10 s
    yield s
    s.kill()
    print("--- server stderr:\n" + s.stderr_text()[-3000:])


def half_close_exchange(server, data):
    """Sends data, half-closes, reads to EOF. Returns (bytes read, seconds from
    the half-close to EOF or reset, how it ended)."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        start = time.monotonic()
        sock.settimeout(READ_TIMEOUT)
        got = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return got, time.monotonic() - start, "timeout"
            except ConnectionResetError:
                return got, time.monotonic() - start, "reset"
            if not chunk:
                return got, time.monotonic() - start, "eof"
            got += chunk
    finally:
        sock.close()


def check_400(answer):
    head, sep, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), f"not a 400: {answer[:200]!r}"
    assert sep, f"no complete head: {answer[:200]!r}"
    assert b"application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert error["code"] == "BAD_REQUEST" and error["message"], error


@pytest.mark.parametrize("name", list(INCOMPLETE_LINES))
def test_half_closed_incomplete_request_line_is_answered_400_at_once(server, name):
    """A request line cut short by a half-close gets 400 BAD_REQUEST (JSON)
    and the connection closes within a second, not at the handshake time-out."""
    answer, took, ending = half_close_exchange(server, INCOMPLETE_LINES[name])
    assert ending != "timeout" and took < ANSWER_WITHIN, (
        f"not closed within {ANSWER_WITHIN}s of the half-close "
        f"(still open after {took:.2f}s, {ending}; got {answer[:100]!r})"
    )
    assert answer, f"closed ({ending}) after {took:.3f}s without an answer"
    check_400(answer)


@pytest.mark.parametrize("name", list(INCOMPLETE_HEADS))
def test_half_closed_incomplete_head_is_closed_at_once(server, name):
    """A request whose head or body is cut short by a half-close is closed
    within a second; if it is answered at all, the answer is 400 BAD_REQUEST."""
    answer, took, ending = half_close_exchange(server, INCOMPLETE_HEADS[name])
    assert ending != "timeout" and took < ANSWER_WITHIN, (
        f"not closed within {ANSWER_WITHIN}s of the half-close "
        f"(still open after {took:.2f}s, {ending}; got {answer[:100]!r})"
    )
    if answer:
        check_400(answer)


def test_server_still_healthy_after_half_closed_heads(server):
    """After every half-closed request above (this module's tests share one
    server and run in order), GET /health still answers 200."""
    r = server.get("/health")
    assert r.status_code == 200, (r.status_code, r.text)
