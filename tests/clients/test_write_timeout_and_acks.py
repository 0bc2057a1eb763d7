"""Blocked writes and cuts seen from outside: a subscriber that never reads is
dropped once WRITE_TIMEOUT_SEC has passed since its writes stalled (the
timeout bounds the whole blocked write, not each partial write), and a
publisher cut as a slow consumer still got an ack for every publish the
server applied.

ACK_LOOPS (default 10) sets how many times the cut scenario runs, each against
a fresh server: the cut races the writer thread, so one run proves little.
"""

import json
import os
import socket
import time
import uuid

import pytest

from clientlib import Closed, SendQueueWatch, publish_ws, subscribe_frame, wait_until

ACK_LOOPS = int(os.environ.get("ACK_LOOPS", "10"))


def health_subscribers(server):
    return server.get("/health").json()["subscribers"]


# -- 2. the write timeout bounds the whole blocked write ---------------------------------


def test_write_timeout_bounds_the_whole_blocked_write(start_server):
    """WRITE_TIMEOUT_SEC=1: a subscriber with a small receive window that never
    reads fills the socket buffers with 100 KiB events (far fewer than
    QUEUE_SIZE, so this is not a slow-consumer cut). The server must drop it
    about WRITE_TIMEOUT_SEC after its writes stalled: the deadline covers the
    whole blocked write of a frame, so trickles of a few bytes (zero-window
    probes, a window that opens by a segment) must not restart the clock.
    Asserted: the subscription leaves /health within WRITE_TIMEOUT_SEC + 1.5 s
    of the moment the server's writes stalled (when its socket's send queue,
    watched in /proc/net/tcp, first stopped growing), and in any case within
    4 s of the last publish ack; and the socket is then closed (EOF or reset after
    reading what was in flight). A timeout that restarts per partial write, or
    that is paid again for the close frame and the flush, takes ~3x."""
    server = start_server(WRITE_TIMEOUT_SEC=1, QUEUE_SIZE=1000, RING_SIZE=10)
    server.create_topic("t")
    sub = server.raw_ws(rcvbuf=8192)  # set before connect: a small window
    sub.send_text(subscribe_frame("t", "s1"))
    ack = sub.recv_json()
    assert ack["type"] == "ack", ack
    wait_until(lambda: health_subscribers(server) == 1, 10, "the subscription in /health")

    watch = SendQueueWatch(server.port, sub.sock.getsockname()[1])
    pad = "x" * (100 * 1024)
    with server.ws() as pub:
        for n in range(1, 61):
            reply, _ = publish_ws(pub, "t", '{"n":%d,"pad":"%s"}' % (n, pad), request_id=f"p{n}")
            assert reply["type"] == "ack", reply
            if health_subscribers(server) == 0:
                break  # dropped already: even better
        last_ack = time.monotonic()

    wait_until(lambda: health_subscribers(server) == 0, 20, "the subscriber to be dropped")
    dropped = time.monotonic()
    watch.stop()
    stalled = watch.stall_time()
    assert stalled is not None, f"never saw the server's send queue stall: {watch.changes[:20]}"
    since_ack = dropped - last_ack
    since_stall = dropped - stalled
    print(
        f"subscriber left /health {since_ack:.2f}s after the last publish ack, "
        f"{since_stall:.2f}s after the server's writes stalled; send queue "
        f"(s after the ack, bytes): {[(round(t - last_ack, 3), v) for t, v in watch.changes]}"
    )
    assert since_stall <= 1 + 1.5, (
        f"subscriber dropped {since_stall:.2f}s after the server's writes stalled "
        f"({since_ack:.2f}s after the last publish ack); WRITE_TIMEOUT_SEC=1 allows 2.5 s"
    )
    assert since_ack <= 4.0, (
        f"subscriber dropped {since_ack:.2f}s after the last publish ack; "
        "WRITE_TIMEOUT_SEC=1 should drop it within ~2.5 s of the writes stalling"
    )

    # Now read what was in flight: the socket must end (EOF or reset).
    sub.read_chunk = 1 << 20
    end = time.monotonic() + 15.0
    try:
        while True:
            sub._fill(end)
            sub.buf = b""
    except Closed:
        pass
    except TimeoutError:
        pytest.fail("the dropped subscriber's socket is still open 15 s later")
    finally:
        sub.close()


# -- 6. an applied publish never loses its ack --------------------------------------------


def publish_frame(topic, request_id, msg_id, n):
    return (
        '{"type":"publish","topic":"%s","request_id":"%s","message":{"id":"%s","payload":{"n":%d}}}'
        % (topic, request_id, msg_id, n)
    )


@pytest.mark.parametrize("iteration", range(ACK_LOOPS))
def test_every_applied_publish_is_acked_before_the_cut(start_server, iteration):
    """QUEUE_SIZE=1: a connection subscribed to its own topic publishes back to
    back without reading until it is cut as a slow consumer (its own events
    overflow its queue). Every publish the server applied (every message id in
    the topic's history) must have been acked on that connection before the
    SLOW_CONSUMER error: a publish that was applied is always acked, and no
    publish is applied after the cut without an ack."""
    server = start_server(QUEUE_SIZE=1, RING_SIZE=100000, WRITE_TIMEOUT_SEC=30)
    server.create_topic("t")
    ws = server.raw_ws()
    ws.send_text(subscribe_frame("t", "s1"))
    ack = ws.recv_json()
    assert ack["type"] == "ack" and ack["request_id"] == "s1", ack

    # Publish without reading; peeking (which frees no window) tells when the
    # error has arrived, so we stop sending soon after the cut.
    ids = {}  # message id -> request id
    sent = 0
    ws.sock.settimeout(3.0)
    for n in range(1, 5001):
        rid, mid = f"r{n}", str(uuid.uuid4())
        try:
            ws.sock.sendall(ws.encode_frame(0x1, publish_frame("t", rid, mid, n).encode()))
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            ids[mid] = rid  # possibly partly sent: the server may or may not have it
            break
        ids[mid] = rid
        sent = n
        if n % 10 == 0 and b"SLOW_CONSUMER" in ws.peek():
            break

    # Read everything until the close.
    messages, close_code, tcp_end = [], None, None
    end = time.monotonic() + 30.0
    while True:
        try:
            kind, *rest = ws.recv_message(max(end - time.monotonic(), 0.001))
        except Closed as e:
            tcp_end = str(e)
            break
        if kind == "close":
            close_code = rest[0]
            break
        messages.append(json.loads(rest[0]))
    ws.close()

    error_at = next(
        (i for i, m in enumerate(messages) if m.get("type") == "error"), len(messages)
    )
    acked = {}
    for m in messages[:error_at]:
        if m.get("type") == "ack" and m.get("request_id", "").startswith("r"):
            acked[m["request_id"]] = m
    late = [m for m in messages[error_at + 1 :]]

    history = server.get("/topics/t/messages").json()["messages"]
    print(
        f"iteration {iteration}: sent {sent}, applied {len(history)}, acked {len(acked)}, "
        f"close {close_code}, tcp end {tcp_end}"
    )
    unacked = [
        (h["seq"], ids.get(h["id"])) for h in history if ids.get(h["id"]) not in acked
    ]
    assert not unacked, (
        f"{len(unacked)} applied publish(es) never acked before the error "
        f"(seq, request_id): {unacked[:10]}; acks after the error: "
        f"{[m.get('request_id') for m in late if m.get('type') == 'ack'][:10]}"
    )
    for h in history:
        assert acked[ids[h["id"]]]["seq"] == h["seq"], (h, acked[ids[h["id"]]])
    assert error_at < len(messages), (
        f"no error frame before the connection ended (close {close_code}, tcp {tcp_end}); "
        f"last: {messages[-1:] if messages else None}"
    )
    error = messages[error_at]
    assert error["error"]["code"] == "SLOW_CONSUMER", error
    assert not late, f"frames after the SLOW_CONSUMER error: {late[:5]}"
    assert len(history) == len(acked), (
        f"{len(acked)} acks but {len(history)} messages applied"
    )
