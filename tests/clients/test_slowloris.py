"""Slowloris: 300 clients (more than MAX_CONNECTIONS=200) trickle a request
head one byte a second, and reconnect once cut, for as long as the attack
lasts. Meanwhile a well-behaved client's GET /health must keep working and
stay fast, every slow connection must be closed by the server within
HANDSHAKE_TIMEOUT_SEC plus a margin, and the log must summarize the cuts and
refusals (about a line a second) instead of writing a line per connection.
"""

import errno
import math
import selectors
import socket
import statistics
import threading
import time

import requests

from clientlib import wait_until

SLOW_CLIENTS = 300
MAX_CONNECTIONS = 200
HANDSHAKE_TIMEOUT_SEC = 10  # the default, spelled out
CLOSE_MARGIN = 4.0  # seconds beyond HANDSHAKE_TIMEOUT_SEC for a busy machine
PROBES = 100
PROBE_SPACING = 0.06  # ~6 s of probing
PROBE_TIMEOUT = 5.0
MIN_SUCCESS = 0.99
MAX_P99 = 0.250  # seconds; 50 ms is the goal on an idle machine (printed)

# Never completes within the test: 1 byte a second for a head of ~120 bytes.
SLOW_HEAD = (
    b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: slowloris\r\n"
    b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n"
)


class SlowClient:
    def __init__(self, addr):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.started = time.monotonic()
        self.connected_at = None
        self.closed_at = None
        self.how = None
        self.answer = b""
        self.sent = 0
        err = self.sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            self.finish(f"connect failed: {errno.errorcode.get(err, err)}")

    def finish(self, how):
        if self.closed_at is None:
            self.closed_at = time.monotonic()
            self.how = how
        try:
            self.sock.close()
        except OSError:
            pass

    @property
    def lifetime(self):
        begin = self.connected_at or self.started
        return (self.closed_at or time.monotonic()) - begin


class Attack:
    """SLOW_CLIENTS slots; each holds one trickling connection and, while the
    attack runs, opens a new one at the next tick after its last was cut."""

    def __init__(self, addr):
        self.addr = addr
        self.sel = selectors.DefaultSelector()
        self.slots = [None] * SLOW_CLIENTS
        self.done = []  # every SlowClient that ended
        self.running = True  # reconnect while True
        self.stop = threading.Event()
        self.error = None
        self.ticks = 0  # seconds of trickling done
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i):
        c = SlowClient(self.addr)
        self.slots[i] = c
        if c.closed_at is not None:
            self.done.append(c)
            self.slots[i] = None
            return
        self.sel.register(c.sock, selectors.EVENT_WRITE | selectors.EVENT_READ, (i, c))

    def _closed(self, i, c, how):
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.finish(how)
        self.done.append(c)
        self.slots[i] = None

    def _send_byte(self, i, c):
        if c.connected_at is None or c.sent >= len(SLOW_HEAD) - 2:
            return
        try:
            c.sent += c.sock.send(SLOW_HEAD[c.sent : c.sent + 1])
        except BlockingIOError:
            pass
        except OSError as e:
            self._closed(i, c, f"send: {e.__class__.__name__}")

    def _on_event(self, i, c, mask):
        if c.connected_at is None and mask & selectors.EVENT_WRITE:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._closed(i, c, f"connect: {errno.errorcode.get(err, err)}")
                return
            c.connected_at = time.monotonic()
            self.sel.modify(c.sock, selectors.EVENT_READ, (i, c))
            self._send_byte(i, c)
            return
        if mask & selectors.EVENT_READ:
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                return
            except ConnectionResetError:
                self._closed(i, c, "reset")
                return
            except OSError as e:
                self._closed(i, c, f"recv: {e.__class__.__name__}")
                return
            if data:
                c.answer += data
            else:
                self._closed(i, c, "eof")

    def _run(self):
        try:
            next_tick = time.monotonic()
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + 1.0
                    for i, c in enumerate(self.slots):
                        if c is None:
                            if self.running:
                                self._open(i)
                        else:
                            self._send_byte(i, c)
                    self.ticks += 1
                    if not self.running and all(c is None for c in self.slots):
                        return
                timeout = max(0.0, min(next_tick - time.monotonic(), 0.2))
                for key, mask in self.sel.select(timeout):
                    i, c = key.data
                    if self.slots[i] is c:
                        self._on_event(i, c, mask)
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            for i, c in enumerate(self.slots):
                if c is not None:
                    c.finish("still open when the attack thread stopped")
            self.sel.close()

    def open_count(self):
        return sum(1 for c in self.slots if c is not None and c.connected_at is not None)


def probe(base):
    """One GET /health on a new connection; (ok, seconds)."""
    session = requests.Session()
    session.trust_env = False
    start = time.monotonic()
    try:
        r = session.get(base + "/health", timeout=PROBE_TIMEOUT, headers={"Connection": "close"})
        ok = r.status_code == 200
    except requests.RequestException:
        ok = False
    finally:
        session.close()
    return ok, time.monotonic() - start


def test_slowloris_does_not_starve_well_behaved_clients(start_server):
    """With MAX_CONNECTIONS=200 and 300 clients trickling request heads a byte a
    second (reconnecting when cut), >= 99% of 100 GET /health on fresh
    connections get 200 with p99 latency under 250 ms; every slow connection
    is closed by the server within HANDSHAKE_TIMEOUT_SEC + margin; the log has
    about one line a second about them, not one per connection."""
    server = start_server(
        MAX_CONNECTIONS=MAX_CONNECTIONS, HANDSHAKE_TIMEOUT_SEC=HANDSHAKE_TIMEOUT_SEC, LOG_LEVEL="INFO"
    )
    baseline_lines = len(server.snapshot_lines())
    attack = Attack((server.host, server.port))
    attack_start = time.monotonic()
    attack.thread.start()

    # Probe once the attack is under way: every slot has connected (or been
    # refused) and the survivors have trickled a second byte.
    def under_way():
        assert attack.error is None, attack.error
        return attack.ticks >= 2

    wait_until(under_way, 15, "two ticks of the attack")

    results = []
    next_probe = time.monotonic()
    for _ in range(PROBES):
        now = time.monotonic()
        if now < next_probe:
            time.sleep(next_probe - now)
        next_probe += PROBE_SPACING
        results.append(probe(server.base))
    probing_ended = time.monotonic()

    # Stop reconnecting; every connection still open must be closed by the server.
    attack.running = False
    attack.thread.join(HANDSHAKE_TIMEOUT_SEC + CLOSE_MARGIN + 5)
    attack.stop.set()
    attack.thread.join(5)
    attack_end = time.monotonic()
    assert attack.error is None, attack.error

    ok = sum(1 for good, _ in results if good)
    latencies = sorted(t for _, t in results)
    p50 = statistics.median(latencies)
    p99 = latencies[max(0, math.ceil(0.99 * len(latencies)) - 1)]
    clients = attack.done
    lifetimes = sorted(c.lifetime for c in clients if c.connected_at is not None)
    hows = {}
    for c in clients:
        key = c.how if not c.answer else f"{c.how} after {c.answer[:12]!r}"
        hows[key] = hows.get(key, 0) + 1
    attack_seconds = attack_end - attack_start
    attack_lines = [
        line
        for t, line in server.snapshot_lines()[baseline_lines:]
        if attack_start <= t <= attack_end + 1.0
    ]
    print(
        f"probes: {ok}/{len(results)} ok, latency p50 {p50 * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms\n"
        f"slow connections: {len(clients)} in {attack_seconds:.1f}s "
        f"(probing ended at {probing_ended - attack_start:.1f}s); lifetimes "
        f"min {lifetimes[0] if lifetimes else 0:.2f}s max {lifetimes[-1] if lifetimes else 0:.2f}s; "
        f"ends: {hows}\n"
        f"log lines during the attack: {len(attack_lines)}"
    )
    for line in attack_lines[:20]:
        print("  " + line)

    assert ok / len(results) >= MIN_SUCCESS, (
        f"only {ok}/{len(results)} GET /health succeeded during the attack"
    )
    assert p99 < MAX_P99, f"GET /health p99 {p99 * 1000:.1f} ms during the attack"
    unclosed = [c for c in clients if c.how and c.how.startswith("still open")]
    assert not unclosed, f"{len(unclosed)} slow connections were never closed by the server"
    late = [c.lifetime for c in clients if c.lifetime > HANDSHAKE_TIMEOUT_SEC + CLOSE_MARGIN]
    assert not late, (
        f"{len(late)} slow connections lived longer than {HANDSHAKE_TIMEOUT_SEC + CLOSE_MARGIN}s "
        f"(longest {max(late):.1f}s)"
    )
    allowed = math.ceil(attack_seconds) + 3
    assert len(attack_lines) <= allowed, (
        f"{len(attack_lines)} log lines about {len(clients)} slow connections in "
        f"{attack_seconds:.1f}s (at most {allowed}: about one a second)"
    )
    r = server.get("/health")
    assert r.status_code == 200
