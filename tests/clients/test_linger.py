"""The writer's linger (WRITE_LINGER_MS) holds back events so that a busy
connection writes them in batches; it never holds back a reply to the client's
own request. Here the linger is 1 s, so a reply it held back would be late by
about that much."""

import json
import time
import uuid

from clientlib import recv_json, recv_until, subscribe_frame

LINGER_MS = 1000
BURST = 4


def publish_frame(topic, n):
    return json.dumps(
        {
            "type": "publish",
            "topic": topic,
            "request_id": f"p{n}",
            "message": {"id": str(uuid.uuid4()), "payload": {"n": n}},
        }
    )


def test_a_reply_is_never_held_back_by_a_linger(start_server):
    """A burst of events, sent at once so that the subscriber's writer writes
    them as a batch and then lingers; then the subscriber pings. The pong must
    come back well within the linger, every round."""
    server = start_server(WRITE_LINGER_MS=LINGER_MS)
    server.create_topic("t")
    with server.ws() as sub, server.ws() as pub:
        sub.send(subscribe_frame("t"))
        assert recv_json(sub)["type"] == "ack"
        n = 0
        for round_ in range(3):
            for _ in range(BURST):
                n += 1
                pub.send(publish_frame("t", n))
            for _ in range(BURST):
                event, _ = recv_until(sub, lambda m: m.get("type") == "event", what="an event")
            assert event["seq"] == n, event
            started = time.monotonic()
            sub.send(json.dumps({"type": "ping", "request_id": f"ping{round_}"}))
            pong, skipped = recv_until(
                sub, lambda m: m.get("request_id") == f"ping{round_}", what="the pong"
            )
            took = time.monotonic() - started
            assert pong["type"] == "pong", pong
            assert not skipped, skipped
            assert took < LINGER_MS / 2000, f"round {round_}: the pong took {took:.3f} s"
