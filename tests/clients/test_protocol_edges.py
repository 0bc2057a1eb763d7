"""Protocol edges seen from outside: a burst of subscribes in one write,
start-up refusing out-of-range settings, how /ws answers requests that are not
an upgrade, topic names no client could address, and strictness about
duplicated JSON keys, duplicated or signed query parameters and the
absolute form of a request target.

Every wait has a deadline; nothing sleeps and hopes.
"""

import json
import os
import re
import subprocess
import time

import pytest
import websockets.sync.client as ws_client

from clientlib import REPO, binary_path, raw_http, recv_json, recv_until, subscribe_frame

BURST = 300


def ws_request(ws, body_text, request_id):
    """Sends one text frame and returns the reply carrying request_id."""
    ws.send(body_text)
    reply, _ = recv_until(ws, lambda m: m.get("request_id") == request_id, what=request_id)
    return reply


# -- 1. a burst of subscribes ----------------------------------------------------


def test_subscribe_burst_in_one_write_gets_every_ack_and_no_cut(start_server):
    """300 subscribe requests arriving in one TCP write on a connection whose
    outbound queue holds 100 items are all executed and all acked (status ok,
    request_id echoed), in a connection that is not cut as a slow consumer:
    the client is reading, it just asked for a lot at once, and requests are
    paced by TCP (the reader waits for room) rather than overflowing the queue.
    Afterwards the connection is still usable (ping gets pong) and all 300
    subscriptions are counted."""
    server = start_server(QUEUE_SIZE=100)
    names = [f"burst-{i:03d}" for i in range(BURST)]
    for name in names:
        server.create_topic(name)

    ws = server.raw_ws()
    ws.send_texts_at_once([subscribe_frame(name, f"s{i}") for i, name in enumerate(names)])

    replies = []
    end = time.monotonic() + 30.0
    while len(replies) < BURST:
        msg = ws.recv_json(max(end - time.monotonic(), 0.001))
        replies.append(msg)
        assert msg.get("type") == "ack", (
            f"reply {len(replies)} of {BURST} is not an ack: {msg}"
        )
    by_id = {}
    for msg in replies:
        assert msg.get("status") == "ok", msg
        rid = msg.get("request_id")
        assert rid not in by_id, f"two acks for {rid}"
        by_id[rid] = msg
    assert set(by_id) == {f"s{i}" for i in range(BURST)}, "acks missing or not echoing request_id"
    for i, name in enumerate(names):
        assert by_id[f"s{i}"]["topic"] == name, by_id[f"s{i}"]

    ws.send_text('{"type":"ping","request_id":"p1"}')
    pong = ws.recv_json()
    assert pong.get("type") == "pong" and pong.get("request_id") == "p1", (
        f"connection not usable after the burst: {pong}"
    )
    health = server.get("/health").json()
    assert health["subscribers"] == BURST, health
    ws.close()


# -- 3. settings out of range ------------------------------------------------------

OUT_OF_RANGE = [
    ("QUEUE_SIZE", "1000000000000", ["100000"]),
    ("QUEUE_SIZE", "18446744073709551615", ["100000"]),
    ("RING_SIZE", "100000000", ["1000000"]),
    ("MAX_MESSAGE_BYTES", "1000000000", ["67108864", "64MiB"]),
    ("HEARTBEAT_SEC", "1e30", ["86400"]),
    ("WRITE_TIMEOUT_SEC", "inf", ["86400"]),
]


@pytest.mark.parametrize("var,value,upper", OUT_OF_RANGE, ids=[f"{v}={x}" for v, x, _ in OUT_OF_RANGE])
def test_out_of_range_setting_stops_start_up_naming_variable_and_range(var, value, upper):
    """A setting beyond its range (huge counts that would allocate without
    bound, seconds that would overflow a deadline, inf) stops start-up within
    5 s with exit code 2 and exactly one line that names the variable and states
    the allowed range ("from ..." with its upper bound), instead of starting or
    falling back to a default."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOST": "127.0.0.1", "PORT": "0"}
    env[var] = value
    proc = subprocess.Popen(
        [binary_path()],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{var}={value}: still running after 5 s; stderr: {err.decode()[-1000:]}")
    text = (out + err).decode("utf-8", "replace")
    lines = [line for line in text.splitlines() if line.strip()]
    assert proc.returncode == 2, f"{var}={value}: exit code {proc.returncode}; output: {text[-1000:]}"
    assert len(lines) == 1, f"{var}={value}: expected one line, got {lines}"
    line = lines[0]
    assert var in line, f"line does not name {var}: {line}"
    assert "from" in line, f"line does not state the allowed range ('from ...'): {line}"
    digits = re.sub(r"(?<=\d)[,_ ](?=\d)", "", line).replace(" ", "")
    assert any(bound in digits for bound in upper), (
        f"line does not give the upper bound {upper[0]}: {line}"
    )


# -- 4. /ws without an upgrade ------------------------------------------------------


def test_options_on_ws_is_204_with_allow(start_server):
    """OPTIONS /ws answers 204 with an Allow header like every other route,
    with or without an API key configured (OPTIONS needs no key)."""
    for settings in ({}, {"API_KEY": "k"}):
        server = start_server(**settings)
        r = server.http.options(server.base + "/ws", timeout=10)
        assert r.status_code == 204, (settings, r.status_code, r.text)
        assert r.headers.get("Allow"), (settings, dict(r.headers))
        assert "GET" in r.headers["Allow"], r.headers["Allow"]
        assert r.content == b"", r.content


def test_ws_without_key_is_401_before_anything_else(start_server):
    """With API_KEY set, GET /ws without the key and without upgrade headers is
    401 UNAUTHORIZED in JSON: the missing key is reported first, so a stranger
    learns nothing about the route."""
    server = start_server(API_KEY="k")
    r = server.get("/ws")
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.json()["error"]["code"] == "UNAUTHORIZED", r.text


def test_ws_with_key_but_no_upgrade_is_426_upgrade_required(start_server):
    """With the right key but no WebSocket upgrade headers, GET /ws answers
    426 Upgrade Required with `Upgrade: websocket` and a JSON error body,
    telling the client what it must do; a real upgrade with the key (header or
    query parameter) still works."""
    server = start_server(API_KEY="k")
    r = server.get("/ws", headers={"X-API-Key": "k"})
    assert r.status_code == 426, (r.status_code, r.text)
    assert r.headers.get("Upgrade", "").lower() == "websocket", dict(r.headers)
    body = r.json()
    assert isinstance(body.get("error", {}).get("code"), str), body
    assert body["error"].get("message"), body

    server.http.headers["X-API-Key"] = "k"  # REST needs the key too
    server.create_topic("t")
    with server.ws(additional_headers={"X-API-Key": "k"}) as ws:
        ack = ws_request(ws, subscribe_frame("t", "s1"), "s1")
        assert ack["type"] == "ack" and ack["status"] == "ok", ack
    with ws_client.connect(
        server.ws_url + "?api_key=k", open_timeout=10, proxy=None, ping_interval=None
    ) as ws:
        ws.send('{"type":"ping","request_id":"p"}')
        assert recv_json(ws)["type"] == "pong"


# -- 9. topic names no client can address ----------------------------------------------


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_segment_names_are_refused(start_server, name):
    """`.` and `..` are refused with 400 BAD_REQUEST: /topics/./messages and
    /topics/../messages are dot segments that URL libraries and proxies
    normalize away, so no client could address such a topic."""
    server = start_server()
    r = server.post("/topics", {"name": name})
    assert r.status_code == 400, (name, r.status_code, r.text)
    assert r.json()["error"]["code"] == "BAD_REQUEST", r.text
    assert name not in [t["name"] for t in server.get("/topics").json()["topics"]]


@pytest.mark.parametrize("name", ["...", ".a", "a.", "._"])
def test_other_names_with_dots_still_work(start_server, name):
    """Names with dots that are not dot segments (`...`, `.a`) are still valid
    topic names, usable over REST and WebSocket."""
    server = start_server()
    r = server.post("/topics", {"name": name})
    assert r.status_code == 201, (name, r.status_code, r.text)
    r = server.post(f"/topics/{name}/messages", {"payload": 1})
    assert r.status_code == 201, (name, r.status_code, r.text)
    r = server.get(f"/topics/{name}/messages")
    assert r.status_code == 200 and len(r.json()["messages"]) == 1, (r.status_code, r.text)


# -- 10. strictness --------------------------------------------------------------------


def test_ws_request_with_duplicate_key_is_bad_request_naming_it(start_server):
    """A WebSocket request with a key given twice is BAD_REQUEST naming the key
    and saying "duplicate", instead of silently taking one of the two values
    (which value wins differs between parsers: a proxy and the server could
    disagree on which topic was meant). The connection stays usable and no
    subscription is made."""
    server = start_server()
    server.create_topic("a")
    server.create_topic("b")
    with server.ws() as ws:
        # The request is refused before its request_id is read, so take the
        # next reply whatever it echoes.
        ws.send('{"type":"subscribe","topic":"a","topic":"b","client_id":"c","request_id":"d1"}')
        reply = recv_json(ws)
        assert reply["type"] == "error", reply
        assert reply["error"]["code"] == "BAD_REQUEST", reply
        message = reply["error"]["message"]
        assert "topic" in message and "duplicate" in message.lower(), message
        assert server.subscribers("a") == 0 and server.subscribers("b") == 0
        pong = ws_request(ws, '{"type":"ping","request_id":"p1"}', "p1")
        assert pong["type"] == "pong", pong


def test_rest_body_with_duplicate_key_is_400_naming_it(start_server):
    """POST /topics with `name` given twice is 400 naming `name`, and creates
    neither topic."""
    server = start_server()
    r = server.post("/topics", data='{"name":"a","name":"b"}')
    assert r.status_code == 400, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["code"] == "BAD_REQUEST", error
    assert "name" in error["message"], error
    assert server.get("/topics").json()["topics"] == []


@pytest.mark.parametrize(
    "query",
    ["since_seq=+5", "last_n=1&last_n=2", "since_seq=1&since_seq=1", "last_n=+1"],
)
def test_history_query_strictness(start_server, query):
    """History query parameters are strict: a sign on a number is refused like
    any other non-digit, and a parameter given twice is refused even when both
    values agree, rather than one of them being picked silently."""
    server = start_server()
    server.create_topic("t")
    server.post("/topics/t/messages", {"payload": 1})
    r = server.get(f"/topics/t/messages?{query}")
    assert r.status_code == 400, (query, r.status_code, r.text)
    assert r.json()["error"]["code"] == "BAD_REQUEST", r.text


def test_absolute_form_request_target_is_served(start_server):
    """A request line in absolute form (`GET http://host:port/health`, which
    RFC 9112 3.2.2 says a server must accept) is routed by its path and answered
    200 with the health JSON."""
    server = start_server()
    request = (
        f"GET http://127.0.0.1:{server.port}/health HTTP/1.1\r\nHost: x\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    status, headers, body = raw_http(server.host, server.port, request)
    assert status == 200, (status, body[:300])
    health = json.loads(body)
    assert {"uptime_sec", "topics", "subscribers"} <= set(health), health
