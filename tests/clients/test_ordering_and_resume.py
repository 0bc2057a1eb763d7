"""Ordering, resume and history seen from outside: event times agree with
event numbers under concurrent publishers; a subscribe with a resume point on a
connection already subscribed replays what came before its subscription began;
and history says which events it no longer holds.

Every wait has a deadline; nothing sleeps and hopes.
"""

import json
import os
import re
import threading
import time
import uuid
from datetime import datetime

import pytest
import requests

from clientlib import REPLY_DEADLINE, recv_json, recv_until, subscribe_frame

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def http_publish(server, topic, payload, session=None):
    s = session or server.http
    r = s.post(
        f"{server.base}/topics/{topic}/messages",
        data=json.dumps({"payload": payload}),
        timeout=REPLY_DEADLINE,
    )
    assert r.status_code == 201, (r.status_code, r.text)
    return r.json()


# -- 5. ts agrees with seq -----------------------------------------------------------------

WS_PUBLISHERS = 4
HTTP_PUBLISHERS = 2
PER_PUBLISHER = 2500  # 6 x 2500 = 15,000
WINDOW = 250  # publishes in flight per WebSocket publisher: keeps the broker contended
TS_LOOPS = int(os.environ.get("TS_LOOPS", "3"))


@pytest.mark.parametrize("iteration", range(TS_LOOPS))
def test_event_ts_never_goes_back_as_seq_goes_up(start_server, iteration):
    """With 4 WebSocket and 2 HTTP publishers running at once on one topic
    (15,000 messages), the one subscriber sees seq 1..N with no gap and `ts`
    (RFC 3339 UTC with milliseconds) never decreasing in seq order: the time
    a publish was accepted is taken in the same step that numbers it, so a
    consumer may order or window events by either. (A ts taken outside that
    step goes back only when a millisecond boundary falls between the two,
    so one run may miss it: TS_LOOPS runs, default 3.)"""
    total = (WS_PUBLISHERS + HTTP_PUBLISHERS) * PER_PUBLISHER
    server = start_server(QUEUE_SIZE=100000, RING_SIZE=10)
    server.create_topic("t")
    events = []
    failures = []

    sub = server.ws().__enter__()  # closed below
    sub.send(subscribe_frame("t", "s1"))
    ack = recv_json(sub)
    assert ack["type"] == "ack" and ack["seq"] == 0, ack

    def read_events():
        try:
            end = time.monotonic() + 120
            while len(events) < total and time.monotonic() < end:
                try:
                    text = sub.recv(timeout=max(end - time.monotonic(), 0.001))
                except TimeoutError:
                    break
                msg = json.loads(text)
                if msg.get("type") != "event":
                    failures.append(f"subscriber got {msg}")
                    return
                events.append((msg["seq"], msg["ts"]))
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"subscriber: {e!r}")

    def ws_publisher(k):
        try:
            with server.ws() as pub:
                for start in range(0, PER_PUBLISHER, WINDOW):
                    batch = range(start, min(start + WINDOW, PER_PUBLISHER))
                    for i in batch:
                        pub.send(
                            '{"type":"publish","topic":"t","request_id":"w%d-%d",'
                            '"message":{"id":"%s","payload":{"w":%d,"i":%d}}}'
                            % (k, i, uuid.uuid4(), k, i)
                        )
                    for _ in batch:
                        reply = recv_json(pub, 30)
                        if reply.get("type") != "ack":
                            failures.append(f"ws publisher {k}: {reply}")
                            return
        except Exception as e:  # noqa: BLE001
            failures.append(f"ws publisher {k}: {e!r}")

    def http_publisher(k):
        try:
            with requests.Session() as s:
                s.trust_env = False
                for i in range(PER_PUBLISHER):
                    http_publish(server, "t", {"h": k, "i": i}, session=s)
        except Exception as e:  # noqa: BLE001
            failures.append(f"http publisher {k}: {e!r}")

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    pubs = [threading.Thread(target=ws_publisher, args=(k,), daemon=True) for k in range(WS_PUBLISHERS)]
    pubs += [
        threading.Thread(target=http_publisher, args=(k,), daemon=True) for k in range(HTTP_PUBLISHERS)
    ]
    for t in pubs:
        t.start()
    for t in pubs:
        t.join(180)
    reader.join(60)
    sub.close()
    assert not failures, failures[:5]
    assert len(events) == total, f"got {len(events)} of {total} events"

    seqs = [s for s, _ in events]
    assert seqs == list(range(1, total + 1)), "events not numbered 1..N in order"
    for _, ts in events:
        assert TS.match(ts), f"ts not RFC 3339 UTC with milliseconds: {ts!r}"
    backwards = []
    prev = None
    for seq, ts in events:
        t = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")
        if prev is not None and t < prev[1]:
            backwards.append((prev[0], prev[2], seq, ts))
        prev = (seq, t, ts)
    assert not backwards, (
        f"{len(backwards)} time(s) ts went back as seq went up, e.g. "
        f"(seq, ts, next seq, ts): {backwards[:5]}"
    )


# -- 7. re-subscribe with a resume point on a subscribed connection ---------------------------


def collect_until_pong(ws, request_id):
    """Sends a ping and returns every message before its pong."""
    ws.send(json.dumps({"type": "ping", "request_id": request_id}))
    _, before = recv_until(
        ws,
        lambda m: m.get("type") == "pong" and m.get("request_id") == request_id,
        what=f"pong {request_id}",
    )
    return before


def subscribed_with_live_events(server, ring_size):
    """Topic t with events 1..5; a connection subscribed after them (ack seq 5)
    that then received live events 6, 7, 8. Returns (ws, epoch)."""
    server.create_topic("t")
    for n in range(1, 6):
        http_publish(server, "t", {"n": n})
    ws = server.ws().__enter__()  # the caller closes it (with ws:)
    ws.send(subscribe_frame("t", "s1"))
    ack = recv_json(ws)
    assert ack["type"] == "ack" and ack["seq"] == 5, ack
    epoch = ack["epoch"]
    for n in range(6, 9):
        http_publish(server, "t", {"n": n})
    live = [recv_json(ws) for _ in range(3)]
    assert [m.get("seq") for m in live] == [6, 7, 8], live
    return ws, epoch


def check_single_delivery_afterwards(server, ws):
    """The connection is still subscribed exactly once: event 9 arrives once."""
    http_publish(server, "t", {"n": 9})
    got = collect_until_pong(ws, "after")
    assert [(m.get("type"), m.get("seq")) for m in got] == [("event", 9)], got


def test_resubscribe_with_since_seq_replays_what_preceded_the_subscription(start_server):
    """A connection subscribed at seq 5 that has received live 6..8 sends
    subscribe again with since_seq=2 and the epoch: the ack says recovered
    true, and exactly events 3, 4, 5 follow (those after since_seq that came
    before its subscription began); 6..8 are not sent twice, and the
    subscription is still single (event 9 arrives once)."""
    server = start_server(RING_SIZE=100)
    ws, epoch = subscribed_with_live_events(server, 100)
    with ws:
        ws.send(subscribe_frame("t", "r1", since_seq=2, epoch=epoch))
        got = collect_until_pong(ws, "p1")
        assert got, "no reply to the resubscribe"
        ack, rest = got[0], got[1:]
        assert ack["type"] == "ack" and ack.get("request_id") == "r1", ack
        assert ack.get("recovered") is True, ack
        assert ack.get("epoch") == epoch and ack.get("seq") == 8, ack
        assert [(m.get("type"), m.get("seq")) for m in rest] == [
            ("event", 3),
            ("event", 4),
            ("event", 5),
        ], rest
        assert [m["message"]["payload"]["n"] for m in rest] == [3, 4, 5]
        check_single_delivery_afterwards(server, ws)


@pytest.mark.parametrize("since", [5, 7, 8])
def test_resubscribe_with_since_seq_at_or_after_subscription_replays_nothing(start_server, since):
    """Resubscribing with since_seq at or after the point the subscription
    began (5) is recovered: true with nothing replayed: everything after
    since_seq was already delivered live on this connection."""
    server = start_server(RING_SIZE=100)
    ws, epoch = subscribed_with_live_events(server, 100)
    with ws:
        ws.send(subscribe_frame("t", "r1", since_seq=since, epoch=epoch))
        got = collect_until_pong(ws, "p1")
        assert len(got) == 1, f"expected the ack alone, got {got}"
        ack = got[0]
        assert ack["type"] == "ack" and ack.get("request_id") == "r1", ack
        assert ack.get("recovered") is True, ack
        check_single_delivery_afterwards(server, ws)


def test_resubscribe_with_wrong_epoch_is_not_recovered(start_server):
    """Resubscribing with a resume point from another epoch says
    recovered: false and replays nothing."""
    server = start_server(RING_SIZE=100)
    ws, epoch = subscribed_with_live_events(server, 100)
    wrong = "0000000000000000" if epoch != "0000000000000000" else "1111111111111111"
    with ws:
        ws.send(subscribe_frame("t", "r1", since_seq=2, epoch=wrong))
        got = collect_until_pong(ws, "p1")
        assert len(got) == 1, f"expected the ack alone, got {got}"
        ack = got[0]
        assert ack["type"] == "ack" and ack.get("recovered") is False, ack
        assert ack.get("epoch") == epoch, ack
        check_single_delivery_afterwards(server, ws)


def test_resubscribe_with_since_seq_the_ring_no_longer_covers_is_not_recovered(start_server):
    """RING_SIZE=3: after events 6..8 the ring holds 6..8 only, so a resume
    from since_seq=2 (which needs 3) says recovered: false and replays
    nothing, while since_seq=5 (needs 6, held) is recovered with nothing to
    replay."""
    server = start_server(RING_SIZE=3)
    ws, epoch = subscribed_with_live_events(server, 3)
    with ws:
        ws.send(subscribe_frame("t", "r1", since_seq=2, epoch=epoch))
        got = collect_until_pong(ws, "p1")
        assert len(got) == 1, f"expected the ack alone, got {got}"
        assert got[0]["type"] == "ack" and got[0].get("recovered") is False, got[0]
        ws.send(subscribe_frame("t", "r2", since_seq=5, epoch=epoch))
        got = collect_until_pong(ws, "p2")
        assert len(got) == 1, f"expected the ack alone, got {got}"
        assert got[0]["type"] == "ack" and got[0].get("recovered") is True, got[0]
        check_single_delivery_afterwards(server, ws)


# -- 8. history says what it skipped --------------------------------------------------------


def test_history_reports_first_seq_and_whether_since_seq_was_covered(start_server):
    """RING_SIZE=5 after 12 publishes: history carries `first_seq` (the oldest
    seq it still holds, 8). With since_seq it also says `recovered`: false when
    events after since_seq are gone (since_seq=0), true when all are held
    (since_seq=7: messages 8..12; since_seq=12: none). Without since_seq there
    is first_seq and no recovered."""
    server = start_server(RING_SIZE=5)
    server.create_topic("t")
    for n in range(1, 13):
        http_publish(server, "t", {"n": n})

    r = server.get("/topics/t/messages?since_seq=0")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body.get("first_seq") == 8, body
    assert body.get("recovered") is False, body
    assert body["seq"] == 12, body

    body = server.get("/topics/t/messages?since_seq=7").json()
    assert body.get("recovered") is True, body
    assert body.get("first_seq") == 8, body
    assert [m["seq"] for m in body["messages"]] == [8, 9, 10, 11, 12], body

    body = server.get("/topics/t/messages?since_seq=12").json()
    assert body.get("recovered") is True, body
    assert body["messages"] == [], body

    body = server.get("/topics/t/messages").json()
    assert body.get("first_seq") == 8, body
    assert "recovered" not in body, body
    assert [m["seq"] for m in body["messages"]] == [8, 9, 10, 11, 12], body


def test_history_of_an_empty_topic_has_first_seq_after_seq(start_server):
    """A topic with nothing published has seq 0 and first_seq 1 (seq + 1: the
    next event is the oldest it will hold)."""
    server = start_server()
    server.create_topic("t")
    body = server.get("/topics/t/messages").json()
    assert body["seq"] == 0 and body.get("first_seq") == 1, body
    assert body["messages"] == [], body


def test_history_with_nothing_held_has_first_seq_after_seq(start_server):
    """RING_SIZE=0 keeps nothing: after 3 publishes history is empty, seq 3,
    and first_seq 4 (seq + 1), so since_seq=0 is not recovered."""
    server = start_server(RING_SIZE=0)
    server.create_topic("t")
    for n in range(3):
        http_publish(server, "t", {"n": n})
    body = server.get("/topics/t/messages").json()
    assert body["seq"] == 3 and body.get("first_seq") == 4, body
    body = server.get("/topics/t/messages?since_seq=0").json()
    assert body.get("recovered") is False, body
    body = server.get("/topics/t/messages?since_seq=3").json()
    assert body.get("recovered") is True, body
