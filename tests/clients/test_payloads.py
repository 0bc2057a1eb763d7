"""Payloads as real JSON encoders write them: Python's json.dumps escapes every
non-ASCII character by default (ensure_ascii=True), so object keys arrive as
\\uXXXX escapes, and keys may hold escaped quotes, backslashes, control
characters and surrogate pairs. Such payloads must be accepted over WebSocket
and REST, delivered with the exact text the publisher sent, and kept in the
history; a lone surrogate, which no subscriber could read, is still refused.
"""

import json
import uuid

import pytest

from clientlib import publish_ws, raw_payload, recv_json, subscribe_frame

RU = {"ключ": "значение"}

CASES = {
    "cyrillic_ensure_ascii": json.dumps(RU),
    "cyrillic_utf8": json.dumps(RU, ensure_ascii=False),
    "escaped_quote_key": json.dumps({'say "hi"': 1}),
    "escaped_backslash_key": json.dumps({"C:\\path\\": "\\"}),
    "escaped_newline_key": json.dumps({"line\nbreak": "a\nb"}),
    "escaped_nul_key": json.dumps({"nul\u0000key": "nul\u0000value"}),
    "control_and_tab_keys": json.dumps({"\t\r\b\f\u001f": [1, 2]}),
    # The escape spelled in upper case, as many encoders (and hand-written JSON) do.
    "emoji_pair_upper": '{"\\uD83D\\uDE80":"\\uD83D\\uDE80 lift-off","k":"\\uD83D\\uDE80"}',
    "emoji_pair_json_dumps": json.dumps({"🚀 rocket": "🚀", "list": ["🚀", {"🚀": "🚀"}]}),
    "nested_escaped_keys": json.dumps(
        {"outer\t": {"ключ": [{'"q"': {"deep\\": None, "ü": 1.5}}], "é\n": {"\u0000": {}}}}
    ),
    "escaped_keys_compact": json.dumps({"ключ": {"\"": "\\"}}, separators=(",", ":")),
    "spaced_escaped_keys": '{ "\\u043a\\u043b\\u044e\\u0447" : [ 1 , 2 ] ,\n "\\"" : { } }',
}

LONE_SURROGATES = {
    "lone_high_in_value": '{"v":"\\uD800"}',
    "lone_high_in_key": '{"\\uD800":1}',
    "lone_low_in_value": '{"v":"x\\uDE80"}',
    "reversed_pair": '{"v":"\\uDE80\\uD83D"}',
    "lone_high_nested_key": '{"ok":{"\\ud800":true}}',
}


@pytest.fixture
def bus(start_server):
    """A server, a topic `p` and a subscriber to it."""
    server = start_server(RING_SIZE=100)
    server.create_topic("p")
    with server.ws() as sub:
        sub.send(subscribe_frame("p", "s1"))
        ack = recv_json(sub)
        assert ack["type"] == "ack", ack
        yield server, sub


def history_entry(server, seq):
    r = server.get(f"/topics/p/messages?since_seq={seq - 1}")
    assert r.status_code == 200, (r.status_code, r.text[:300])
    body = r.json()
    entries = [m for m in body["messages"] if m["seq"] == seq]
    assert entries, f"seq {seq} not in history: {r.text[:300]}"
    return entries[0], r.text


@pytest.mark.parametrize("case", sorted(CASES))
def test_ws_publish_delivers_escaped_payload_exactly(bus, case):
    """A WebSocket publish of a json.dumps-style payload (escaped keys, escaped
    specials, surrogate pairs) is acked and reaches the subscriber with the
    exact payload text sent; the history holds it too."""
    server, sub = bus
    text = CASES[case]
    with server.ws() as pub:
        reply, msg_id = publish_ws(pub, "p", text, request_id="m1")
    assert reply["type"] == "ack", f"publish refused: {reply}"
    assert_delivered_exactly(server, sub, reply["seq"], msg_id, text)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rest_publish_delivers_escaped_payload_exactly(bus, case):
    """POST /topics/{name}/messages with a json.dumps-style payload answers 201
    with its seq, the WebSocket subscriber gets the exact payload text, and
    GET /topics/{name}/messages returns it."""
    server, sub = bus
    text = CASES[case]
    msg_id = str(uuid.uuid4())
    body = '{"id":"%s","payload":%s}' % (msg_id, text)
    r = server.post(
        "/topics/p/messages",
        data=body.encode("utf-8"),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 201, f"publish refused: {r.status_code} {r.text[:300]}"
    answer = r.json()
    assert answer["status"] == "published" and answer["id"] == msg_id, answer
    assert_delivered_exactly(server, sub, answer["seq"], msg_id, text)


def assert_delivered_exactly(server, sub, seq, msg_id, text):
    """The subscriber's next event is message `seq` with the payload text as
    published, byte for byte, and the history holds it the same way."""
    event_text = sub.recv(timeout=10)
    event = json.loads(event_text)
    assert event["type"] == "event" and event["seq"] == seq, event_text[:300]
    assert event["message"]["id"] == msg_id
    assert event["message"]["payload"] == json.loads(text), "payload changed in delivery"
    assert raw_payload(event_text) == text, "payload text not forwarded byte for byte"
    entry, history_text = history_entry(server, seq)
    assert entry["id"] == msg_id and entry["payload"] == json.loads(text)
    assert text in history_text, "history does not hold the payload text as sent"


@pytest.mark.parametrize("case", sorted(LONE_SURROGATES))
def test_lone_surrogate_still_refused(bus, case):
    """A payload with a lone surrogate escape (in a value or a key) is refused
    with BAD_REQUEST over WebSocket and REST, nothing is published, and the
    connection stays usable."""
    server, sub = bus
    text = LONE_SURROGATES[case]
    reply, _ = publish_ws(sub, "p", text, request_id="bad")
    assert reply["type"] == "error" and reply["error"]["code"] == "BAD_REQUEST", reply
    assert "payload" in reply["error"]["message"], reply
    r = server.post("/topics/p/messages", data=('{"payload":%s}' % text).encode())
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"]["code"] == "BAD_REQUEST"
    assert server.get("/stats").json()["topics"]["p"]["messages"] == 0
    sub.send('{"type":"ping","request_id":"alive"}')
    pong = recv_json(sub)
    assert pong["type"] == "pong" and pong["request_id"] == "alive", pong
