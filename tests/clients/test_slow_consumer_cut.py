"""The slow-consumer policy seen from outside: a subscriber that stops reading
is cut without slowing the publisher, receives every event queued before the
cut, then SLOW_CONSUMER naming the last of them, then close 1008, and can
resume from there with nothing lost; and on shutdown a slow reader still gets
everything queued, then server_shutdown, then close 1001.

CUT_LOOPS (default 5) sets how many times the cut scenario runs, each against
a fresh server: the cut races the writer thread, so one run proves little.
"""

import json
import os
import signal
import time

import pytest

from clientlib import Closed, publish_ws, recv_json, subscribe_frame, wait_until

CUT_LOOPS = int(os.environ.get("CUT_LOOPS", "5"))
PAYLOAD_BYTES = 32 * 1024
MAX_PUBLISHES = 1000
SETTINGS = dict(RING_SIZE=1000, QUEUE_SIZE=100, WRITE_TIMEOUT_SEC=30)


def payload(n, size=PAYLOAD_BYTES):
    # ~32 KiB of JSON, numbered so that a misplaced event is easy to spot.
    return '{"n":%d,"pad":"%s"}' % (n, "x" * size)


def pad_size(iteration):
    """32 KiB give or take 4 KiB, different in each iteration, so that the cut
    catches the writer at a different point of a frame each time."""
    return PAYLOAD_BYTES - 4096 + (iteration * 2617) % 8192


def read_until_close(sub, deadline_s=30.0):
    """Reads every message until the Close frame; returns (texts, close code)."""
    end = time.monotonic() + deadline_s
    texts = []
    while True:
        try:
            kind, *rest = sub.recv_message(max(end - time.monotonic(), 0.001))
        except Closed as e:
            last = json.loads(texts[-1]) if texts else None
            if last and last.get("type") == "event":
                last = {"type": "event", "seq": last.get("seq")}
            raise AssertionError(
                f"TCP ended ({e}) without a Close frame after {len(texts)} messages; last: {last}"
            )
        if kind == "close":
            return texts, rest[0]
        texts.append(rest[0])


@pytest.mark.parametrize("iteration", range(CUT_LOOPS))
def test_cut_subscriber_gets_every_queued_event_then_slow_consumer_and_resumes(
    start_server, iteration
):
    """A subscriber that stops reading is cut (its subscription gone from
    /stats) while the publisher's acks keep coming; reading afterwards yields
    events 1..S with no gap, then SLOW_CONSUMER with topic t and seq S, then
    close 1008; resuming with since_seq=S and the first epoch recovers exactly
    the events after S."""
    server = start_server(**SETTINGS)
    server.create_topic("t")

    sub = server.raw_ws(rcvbuf=8192)  # set before connect: a small window
    sub.send_text(subscribe_frame("t", "s1"))
    ack = sub.recv_json()
    assert ack["type"] == "ack" and ack["request_id"] == "s1", ack
    epoch = ack["epoch"]
    assert ack["seq"] == 0, ack
    wait_until(lambda: server.subscribers("t") == 1, 10, "the subscription in /stats")

    # The subscriber reads nothing from here until it has been cut.
    last_seq = 0
    size = pad_size(iteration)
    with server.ws() as pub:
        for n in range(1, MAX_PUBLISHES + 1):
            reply, _ = publish_ws(pub, "t", payload(n, size), request_id=f"p{n}")
            assert reply["type"] == "ack", reply
            assert reply["seq"] == n, reply
            last_seq = n
            if server.subscribers("t") == 0:
                break
        else:
            pytest.fail(f"subscriber not cut after {MAX_PUBLISHES} publishes of 32 KiB")
    print(f"iteration {iteration}: cut after {last_seq} publishes of {size} bytes")

    texts, close_code = read_until_close(sub)
    assert sub.wait_eof(10), "no TCP close after the Close frame"
    sub.close()
    assert texts, "nothing received before the close"
    messages = [json.loads(t) for t in texts]
    events, last = messages[:-1], messages[-1]
    assert all(m["type"] == "event" and m["topic"] == "t" for m in events), [
        {k: v for k, v in m.items() if k != "message"} for m in events if m["type"] != "event"
    ]
    seqs = [m["seq"] for m in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"not contiguous from 1: {seqs[:5]}...{seqs[-5:]}"
    for m in events:
        assert m["message"]["payload"]["n"] == m["seq"], "event body does not match its seq"
    assert last["type"] == "error", f"last frame before close is not the error: {str(last)[:300]}"
    assert last["error"]["code"] == "SLOW_CONSUMER", last
    assert last.get("topic") == "t", last
    cut_seq = last.get("seq")
    assert cut_seq == (seqs[-1] if seqs else 0), f"error seq {cut_seq}, last event seq {seqs[-1:]}"
    assert close_code == 1008, f"close code {close_code}"
    assert cut_seq < last_seq, "the cut came after the last publish?"

    # Resume from the cut: exactly the events after it, and nothing more.
    with server.ws() as again:
        again.send(subscribe_frame("t", "r1", since_seq=cut_seq, epoch=epoch))
        ack = recv_json(again)
        assert ack["type"] == "ack" and ack["request_id"] == "r1", ack
        assert ack.get("recovered") is True, ack
        assert ack["epoch"] == epoch and ack["seq"] == last_seq, ack
        replayed = [recv_json(again) for _ in range(last_seq - cut_seq)]
        assert [m["seq"] for m in replayed] == list(range(cut_seq + 1, last_seq + 1))
        assert all(m["type"] == "event" and m["message"]["payload"]["n"] == m["seq"] for m in replayed)
        again.send('{"type":"ping","request_id":"after"}')
        nxt = recv_json(again)
        assert nxt["type"] == "pong" and nxt["request_id"] == "after", f"extra frame: {str(nxt)[:200]}"


def test_shutdown_flushes_a_slow_reader_then_server_shutdown_then_1001(start_server):
    """On SIGTERM a subscriber that reads slowly still receives every event
    queued for it (megabytes of them, still in the server's queue), in order,
    then info server_shutdown, then close 1001; the server exits 0."""
    # A queue long enough that 300 events never overflow it: no cut here.
    server = start_server(RING_SIZE=1000, QUEUE_SIZE=1000, SHUTDOWN_GRACE_SEC=30)
    server.create_topic("t")
    sub = server.raw_ws(rcvbuf=8192)
    sub.send_text(subscribe_frame("t", "s1"))
    ack = sub.recv_json()
    assert ack["type"] == "ack", ack
    wait_until(lambda: server.subscribers("t") == 1, 10, "the subscription in /stats")

    published = 300  # ~9.6 MB: more than the socket buffers hold
    with server.ws() as pub:
        for n in range(1, published + 1):
            reply, _ = publish_ws(pub, "t", payload(n), request_id=f"p{n}")
            assert reply["type"] == "ack" and reply["seq"] == n, reply
    assert server.subscribers("t") == 1, "the subscriber was cut; the shutdown case needs it subscribed"
    m = server.metrics()
    unwritten = m["pubsub_events_delivered_total"] - m["pubsub_publish_to_write_seconds_count"]
    print(f"{unwritten:.0f} of {published} events not yet written at SIGTERM")
    assert unwritten > 0, "every event was written already: nothing left for shutdown to flush"

    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutting down" in server.stderr_text(), 10, "the shutdown log line")

    # Read slowly: 4 KiB at a time with a pause, so that the server's flush
    # waits on this reader for a few seconds.
    sub.read_chunk, sub.read_pause = 4096, 0.001
    sub_texts, close_code = read_until_close(sub, 60)
    sub.read_chunk, sub.read_pause = 65536, 0.0
    sub.wait_eof(10)
    sub.close()

    messages = [json.loads(t) for t in sub_texts]
    events = [m for m in messages if m["type"] == "event"]
    seqs = [m["seq"] for m in events]
    assert seqs == list(range(1, published + 1)), (
        f"got {len(seqs)} events ({seqs[:1]}..{seqs[-1:]}), expected 1..{published}; "
        f"then {[m for m in messages if m['type'] != 'event'][:3]}"
    )
    others = [m for m in messages if m["type"] != "event"]
    assert messages[-1].get("type") == "info" and messages[-1].get("msg") == "server_shutdown", others
    assert [m for m in others if m.get("msg") != "ping"] == [messages[-1]], others
    assert close_code == 1001, close_code
    assert server.terminate(30) == 0
