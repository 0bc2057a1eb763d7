"""Memory bounds that hold whatever clients publish: MAX_RETAINED_BYTES caps
the event frames held in all topics' rings together (the oldest events across
all topics go first, and publishing never fails because of it), and
MAX_TOPICS caps the number of topics (507 TOO_MANY_TOPICS beyond it).
/metrics shows pubsub_retained_bytes and pubsub_retained_bytes_limit.
"""

import json

from clientlib import publish_ws, recv_json, subscribe_frame

LIMIT = 1024 * 1024
PAYLOAD_BYTES = 100 * 1024
TOPICS = [f"mem-{i:02d}" for i in range(20)]


def big_payload(n):
    return '{"n":%d,"blob":"%s"}' % (n, "m" * PAYLOAD_BYTES)


def retained(server):
    m = server.metrics()
    assert "pubsub_retained_bytes" in m, "no pubsub_retained_bytes gauge in /metrics"
    assert "pubsub_retained_bytes_limit" in m, "no pubsub_retained_bytes_limit gauge in /metrics"
    return m["pubsub_retained_bytes"], m["pubsub_retained_bytes_limit"]


def publish_round_robin(server, count, check_every=None):
    """Publishes `count` big payloads over TOPICS in turn, each acked; returns
    [(topic, seq)] in publish order."""
    order = []
    with server.ws() as pub:
        for n in range(count):
            topic = TOPICS[n % len(TOPICS)]
            reply, _ = publish_ws(pub, topic, big_payload(n), request_id=f"p{n}")
            assert reply["type"] == "ack", f"publish {n} refused: {reply}"
            order.append((topic, reply["seq"]))
            if check_every and n % check_every == 0:
                used, limit = retained(server)
                assert used <= limit, f"retained {used} > limit {limit} after publish {n}"
    return order


def test_retained_bytes_stay_within_limit_and_oldest_go_first(start_server):
    """With MAX_RETAINED_BYTES=1 MiB and 20 topics, 200 publishes of 100 KiB are
    all acked; the retained-bytes gauge never exceeds the limit; the histories
    together hold at most 1 MiB and exactly the most recent publishes (the
    oldest, across all topics, were dropped first); resuming the first topic
    from seq 1 says recovered: false, resuming the last from just before its
    newest event recovers it."""
    server = start_server(MAX_RETAINED_BYTES=LIMIT, RING_SIZE=1000, QUEUE_SIZE=100)
    for t in TOPICS:
        server.create_topic(t)
    used, limit = retained(server)
    assert limit == LIMIT and used == 0, (used, limit)
    epochs = {t: server.get(f"/topics/{t}/messages").json()["epoch"] for t in TOPICS}

    order = publish_round_robin(server, 200, check_every=1)
    used, limit = retained(server)
    assert 0 < used <= limit, (used, limit)

    held = {}
    payload_bytes = 0
    for t in TOPICS:
        r = server.get(f"/topics/{t}/messages")
        assert r.status_code == 200
        body = r.json()
        assert body["seq"] == 10, f"{t}: last seq {body['seq']}, expected 10"
        for m in body["messages"]:
            held[(t, m["seq"])] = m
            payload_bytes += len(json.dumps(m["payload"], separators=(",", ":")))
    # Every retained frame is larger than its payload, so this bounds them from below.
    assert payload_bytes <= LIMIT, f"histories hold {payload_bytes} payload bytes > {LIMIT}"
    assert held, "nothing retained at all"
    newest = order[-1]
    assert newest in held, f"the most recent publish {newest} was dropped"
    k = len(held)
    assert set(held) == set(order[-k:]), (
        "retained events are not the most recent publishes across all topics: "
        f"held {sorted(held)}, newest {order[-k:]}"
    )
    assert ("mem-00", 1) not in held, "the first topic's first event was kept"
    print(f"retained {k} events of 100 KiB, gauge {used:.0f} bytes of {limit:.0f}")

    with server.ws() as ws:
        ws.send(subscribe_frame("mem-00", "r0", since_seq=1, epoch=epochs["mem-00"]))
        ack = recv_json(ws)
        assert ack["type"] == "ack" and ack.get("recovered") is False, ack
        last_topic, last_seq = newest
        ws.send(subscribe_frame(last_topic, "r1", since_seq=last_seq - 1, epoch=epochs[last_topic]))
        ack = recv_json(ws)
        assert ack["type"] == "ack" and ack.get("recovered") is True, ack
        event = recv_json(ws)
        assert event["type"] == "event" and event["seq"] == last_seq and event["topic"] == last_topic


def test_rss_stays_flat_when_publishing_far_beyond_the_limit(start_server):
    """2000 publishes of 100 KiB (200 MB, which RING_SIZE=1000 over 20 topics
    would otherwise keep) leave the server's RSS under 64 MiB with
    MAX_RETAINED_BYTES=1 MiB, and the gauge within the limit."""
    server = start_server(MAX_RETAINED_BYTES=LIMIT, RING_SIZE=1000, QUEUE_SIZE=100)
    for t in TOPICS:
        server.create_topic(t)
    rss_before = server.rss_bytes()
    publish_round_robin(server, 2000)
    rss = server.rss_bytes()
    print(f"RSS {rss_before / 2**20:.1f} MiB before, {rss / 2**20:.1f} MiB after 2000 x 100 KiB")
    assert rss < 64 * 2**20, f"RSS {rss / 2**20:.1f} MiB after 200 MB published"
    used, limit = retained(server)
    assert used <= limit, (used, limit)


def test_max_topics_refuses_with_507_and_frees_on_delete(start_server):
    """With MAX_TOPICS=5, five topics are created, the sixth gets 507
    TOO_MANY_TOPICS and changes nothing, and deleting one makes room again."""
    server = start_server(MAX_TOPICS=5)
    names = [f"cap-{i}" for i in range(5)]
    for name in names:
        server.create_topic(name)
    r = server.post("/topics", {"name": "cap-5"})
    assert r.status_code == 507, (r.status_code, r.text)
    assert r.headers.get("Content-Type", "").startswith("application/json")
    assert r.json()["error"]["code"] == "TOO_MANY_TOPICS", r.text
    listed = [t["name"] for t in server.get("/topics").json()["topics"]]
    assert listed == names, listed
    assert server.get("/health").json()["topics"] == 5
    r = server.delete("/topics/cap-2")
    assert r.status_code == 200, r.text
    r = server.post("/topics", {"name": "cap-5"})
    assert r.status_code == 201, (r.status_code, r.text)
    listed = [t["name"] for t in server.get("/topics").json()["topics"]]
    assert listed == ["cap-0", "cap-1", "cap-3", "cap-4", "cap-5"], listed
    r = server.post("/topics", {"name": "cap-6"})
    assert r.status_code == 507, (r.status_code, r.text)
