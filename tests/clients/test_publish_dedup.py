"""Publishes are safe to retry: a message id seen again on the same topic,
while the first message with it is still in the topic's ring, is a duplicate.
The retry is acknowledged with the ORIGINAL seq and `"duplicate": true`,
no event is sent again and history holds the message once. This holds over a
new connection, across WebSocket and HTTP, and for every spelling of the same
UUID (ids are compared, and echoed, in canonical form: lower case with
hyphens).

The window is the ring: once RING_SIZE newer messages have pushed the first one
out, the same id publishes anew with a new seq. A different topic is a
different namespace.

Every wait has a deadline; nothing sleeps and hopes.
"""

import json
import uuid

import pytest

from clientlib import recv_until, subscribe_frame

UUID = "7f8e2a9c-4b1d-4c3e-9f6a-1b2c3d4e5f60"


def ws_publish(ws, topic, msg_id, payload, request_id=None):
    """Publishes with `msg_id` written exactly as given; returns the reply."""
    request_id = request_id or uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "type": "publish",
                "topic": topic,
                "request_id": request_id,
                "message": {"id": msg_id, "payload": payload},
            }
        )
    )
    reply, _ = recv_until(
        ws,
        lambda m: m.get("request_id") == request_id and m.get("type") in ("ack", "error"),
        what=f"reply to publish {request_id}",
    )
    assert reply["type"] == "ack", reply
    return reply


def http_publish(server, topic, msg_id, payload):
    r = server.post(f"/topics/{topic}/messages", {"id": msg_id, "payload": payload})
    return r.status_code, r.json()


def assert_fresh_ws(ack, seq):
    assert ack.get("status") == "ok" and ack.get("seq") == seq, ack
    assert ack.get("duplicate") in (None, False), f"a first publish flagged duplicate: {ack}"


def assert_dup_ws(ack, seq):
    assert ack.get("status") == "ok", ack
    assert ack.get("duplicate") is True, f"retry not recognized: {ack}"
    assert ack.get("seq") == seq, f"duplicate ack must carry the original seq {seq}: {ack}"


def assert_fresh_http(status, body, seq):
    assert status == 201, (status, body)
    assert body.get("status") == "published" and body.get("seq") == seq, body
    assert body.get("duplicate") in (None, False), body


def assert_dup_http(status, body, seq):
    assert status == 200, f"a duplicate over HTTP is 200, not {status}: {body}"
    assert body.get("status") == "published", body
    assert body.get("duplicate") is True and body.get("seq") == seq, body


class Subscriber:
    """A subscriber on topic t that checks which events arrive, by closing
    each check with a marker publish that must be the very next event."""

    def __init__(self, server, topic="t"):
        self.server, self.topic = server, topic
        self.ws = server.ws().__enter__()  # closed by close()
        self.ws.send(subscribe_frame(topic, "sub"))
        ack, _ = recv_until(self.ws, lambda m: m.get("request_id") == "sub")
        assert ack["type"] == "ack", ack

    def events_until_marker(self):
        """Publishes a marker over HTTP; returns the events that came before it."""
        status, body = http_publish(self.server, self.topic, str(uuid.uuid4()), {"marker": True})
        assert status == 201, (status, body)
        marker, before = recv_until(
            self.ws,
            lambda m: m.get("type") == "event" and m["message"]["payload"] == {"marker": True},
            what="the marker event",
        )
        return before, marker

    def close(self):
        self.ws.close()


def history_ids(server, topic="t"):
    return [m["id"] for m in server.get(f"/topics/{topic}/messages").json()["messages"]]


def test_ws_retry_is_acked_with_original_seq_and_not_delivered_again(start_server):
    """The same id published twice on one WebSocket: the retry's ack has the
    original seq and duplicate: true; the subscriber gets the event once
    (the next event after the retry is the next real message, seq 2); history
    holds the message once."""
    server = start_server(RING_SIZE=100)
    server.create_topic("t")
    sub = Subscriber(server)
    with server.ws() as pub:
        assert_fresh_ws(ws_publish(pub, "t", UUID, {"n": 1}), 1)
        assert_dup_ws(ws_publish(pub, "t", UUID, {"n": 1}), 1)
    before, marker = sub.events_until_marker()
    assert [(m["seq"], m["message"]["id"]) for m in before] == [(1, UUID)], before
    assert marker["seq"] == 2, f"the retry took a seq: marker is {marker['seq']}"
    assert history_ids(server).count(UUID) == 1, history_ids(server)
    sub.close()


SPELLINGS = [
    "{" + UUID.upper() + "}",
    "urn:uuid:" + UUID,
    UUID.replace("-", ""),
    UUID.upper(),
    UUID.replace("-", "").upper(),
]


@pytest.mark.parametrize("first", [UUID] + SPELLINGS, ids=["canonical"] + ["spelling%d" % i for i in range(len(SPELLINGS))])
def test_every_spelling_of_a_uuid_is_the_same_id_and_echoed_canonical(start_server, first):
    """Ids are compared in canonical form: whichever spelling came first
    (braced upper case, urn:uuid:, 32 hex digits, upper case), the event and
    history carry the canonical lower-case hyphenated form, and every other
    spelling of the same UUID is a duplicate of it."""
    server = start_server(RING_SIZE=100)
    server.create_topic("t")
    sub = Subscriber(server)
    with server.ws() as pub:
        ack = ws_publish(pub, "t", first, {"n": 1})
        assert_fresh_ws(ack, 1)
        if "id" in ack:
            assert ack["id"] == UUID, f"ack id not canonical: {ack}"
        for spelling in [UUID] + SPELLINGS:
            if spelling == first:
                continue
            assert_dup_ws(ws_publish(pub, "t", spelling, {"n": 1}), 1)
            status, body = http_publish(server, "t", spelling, {"n": 1})
            assert_dup_http(status, body, 1)
            assert body.get("id") == UUID, f"HTTP answer id not canonical: {body}"
    before, marker = sub.events_until_marker()
    assert [m["seq"] for m in before] == [1], before
    assert before[0]["message"]["id"] == UUID, f"event id not canonical: {before[0]}"
    assert marker["seq"] == 2, marker
    assert history_ids(server) == [UUID, marker["message"]["id"]], history_ids(server)
    sub.close()


def test_http_first_publish_is_201_and_retry_is_200_duplicate(start_server):
    """Over HTTP the first publish is 201 (no duplicate flag, or false), the
    retry 200 with {"status":"published",...,"seq":N,"duplicate":true}, and
    the subscriber gets one event."""
    server = start_server(RING_SIZE=100)
    server.create_topic("t")
    sub = Subscriber(server)
    status, body = http_publish(server, "t", UUID, {"n": 1})
    assert_fresh_http(status, body, 1)
    assert body.get("id") == UUID, body
    status, body = http_publish(server, "t", UUID.upper(), {"n": 1})
    assert_dup_http(status, body, 1)
    assert body.get("topic") == "t" and body.get("id") == UUID, body
    before, marker = sub.events_until_marker()
    assert [m["seq"] for m in before] == [1] and marker["seq"] == 2, (before, marker)
    sub.close()


def test_retry_over_a_new_connection_is_recognized(start_server):
    """A publisher that lost its connection before the ack and retries over a
    new one gets the original seq and duplicate: true."""
    server = start_server(RING_SIZE=100)
    server.create_topic("t")
    sub = Subscriber(server)
    with server.ws() as pub:
        assert_fresh_ws(ws_publish(pub, "t", UUID, {"n": 1}), 1)
    with server.ws() as pub:
        assert_dup_ws(ws_publish(pub, "t", UUID, {"n": 1}), 1)
    before, marker = sub.events_until_marker()
    assert [m["seq"] for m in before] == [1] and marker["seq"] == 2, (before, marker)
    sub.close()


@pytest.mark.parametrize("order", ["ws-then-http", "http-then-ws"])
def test_retry_on_the_other_path_is_recognized(start_server, order):
    """WebSocket and HTTP publishes share one de-duplication: a first publish
    over one and a retry over the other is a duplicate with the original seq."""
    server = start_server(RING_SIZE=100)
    server.create_topic("t")
    sub = Subscriber(server)
    with server.ws() as pub:
        if order == "ws-then-http":
            assert_fresh_ws(ws_publish(pub, "t", UUID, {"n": 1}), 1)
            assert_dup_http(*http_publish(server, "t", UUID, {"n": 1}), 1)
        else:
            assert_fresh_http(*http_publish(server, "t", UUID, {"n": 1}), 1)
            assert_dup_ws(ws_publish(pub, "t", UUID, {"n": 1}), 1)
    before, marker = sub.events_until_marker()
    assert [m["seq"] for m in before] == [1] and marker["seq"] == 2, (before, marker)
    assert history_ids(server).count(UUID) == 1
    sub.close()


def test_same_id_on_another_topic_is_not_a_duplicate(start_server):
    """De-duplication is per topic: the same id on another topic is a new
    message there, with that topic's next seq and its own event."""
    server = start_server(RING_SIZE=100)
    server.create_topic("t")
    server.create_topic("u")
    sub_u = Subscriber(server, "u")
    with server.ws() as pub:
        assert_fresh_ws(ws_publish(pub, "t", UUID, {"n": 1}), 1)
        assert_fresh_ws(ws_publish(pub, "u", UUID, {"n": 1}), 1)
    status, body = http_publish(server, "u", UUID, {"n": 1})
    assert_dup_http(status, body, 1)  # ...but on u itself it now is one
    before, marker = sub_u.events_until_marker()
    assert [(m["topic"], m["seq"]) for m in before] == [("u", 1)], before
    assert marker["seq"] == 2, marker
    sub_u.close()


def test_the_window_is_the_ring(start_server):
    """RING_SIZE=3: while the first message is among the 3 the ring holds, a
    retry is a duplicate; once 3 newer messages pushed it out, the same id is
    published anew with a new seq and delivered again. This is the documented
    de-duplication window."""
    server = start_server(RING_SIZE=3)
    server.create_topic("t")
    sub = Subscriber(server)
    with server.ws() as pub:
        assert_fresh_ws(ws_publish(pub, "t", UUID, {"n": 1}), 1)
        assert_fresh_ws(ws_publish(pub, "t", str(uuid.uuid4()), {"n": 2}), 2)
        assert_fresh_ws(ws_publish(pub, "t", str(uuid.uuid4()), {"n": 3}), 3)
        assert_dup_ws(ws_publish(pub, "t", UUID, {"n": 1}), 1)  # ring: 1, 2, 3
        assert_fresh_ws(ws_publish(pub, "t", str(uuid.uuid4()), {"n": 4}), 4)  # ring: 2, 3, 4
        ack = ws_publish(pub, "t", UUID, {"n": 1})
        assert_fresh_ws(ack, 5)
    before, marker = sub.events_until_marker()
    assert [m["seq"] for m in before] == [1, 2, 3, 4, 5], [m["seq"] for m in before]
    assert before[-1]["message"]["id"] == UUID
    assert marker["seq"] == 6, marker
    sub.close()
