"""Independent clients for the black-box suite: the server under test as a
child process, a REST client, a WebSocket client built on `websockets`, and a
raw-socket WebSocket client (RFC 6455 by hand) for cases where the test must
control exactly when bytes are read.

Nothing here sleeps and hopes: every wait polls its condition until a deadline.
"""

import base64
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid

import requests
import websockets.sync.client as ws_client

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
START_DEADLINE = 20.0  # seconds from exec to the "listening on" line
REPLY_DEADLINE = 10.0  # one reply on a busy 2-core machine
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def binary_path():
    path = os.environ.get("PUBSUB_BIN", "target/release/pubsub-backend")
    if not os.path.isabs(path):
        path = os.path.join(REPO, path)
    return path


def wait_until(condition, deadline_s, what, interval=0.02):
    """Polls condition() until it returns something truthy; fails at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(interval)


class Server:
    """One server process on a free loopback port (PORT=0: the OS picks it and
    the start-up line names it), in a clean environment plus `settings`. Its
    stderr is collected line by line with the time each line arrived."""

    def __init__(self, **settings):
        self.settings = {k: str(v) for k, v in settings.items()}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_BACKTRACE": "1"}
        env.update({"HOST": "127.0.0.1", "PORT": "0", "LOG_LEVEL": "INFO"})
        env.update(self.settings)
        self.lines = []  # (monotonic time, text)
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [binary_path()],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        try:
            match = wait_until(self._listening, START_DEADLINE, "the 'listening on' line")
        except AssertionError:
            self.kill()
            raise AssertionError(f"server did not start; stderr: {self.stderr_text()[-2000:]}")
        self.port = int(match.group(1))
        self.host = "127.0.0.1"
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.http = requests.Session()
        self.http.trust_env = False  # never through a proxy from the environment

    def _read_stderr(self):
        for raw in iter(self.proc.stderr.readline, b""):
            with self._lock:
                self.lines.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip("\n")))

    def _listening(self):
        if self.proc.poll() is not None:
            raise AssertionError(
                f"server exited with {self.proc.returncode}: {self.stderr_text()[-2000:]}"
            )
        for _, line in self.snapshot_lines():
            m = LISTENING.search(line)
            if m:
                return m
        return None

    def snapshot_lines(self):
        with self._lock:
            return list(self.lines)

    def stderr_text(self):
        return "\n".join(line for _, line in self.snapshot_lines())

    # -- REST --------------------------------------------------------------

    def get(self, path, **kw):
        kw.setdefault("timeout", REPLY_DEADLINE)
        return self.http.get(self.base + path, **kw)

    def post(self, path, body=None, data=None, **kw):
        kw.setdefault("timeout", REPLY_DEADLINE)
        if body is not None:
            data = json.dumps(body)
        return self.http.post(self.base + path, data=data, **kw)

    def delete(self, path, **kw):
        kw.setdefault("timeout", REPLY_DEADLINE)
        return self.http.delete(self.base + path, **kw)

    def create_topic(self, name):
        r = self.post("/topics", {"name": name})
        assert r.status_code == 201, (r.status_code, r.text)
        return r

    def subscribers(self, topic):
        return self.get("/stats").json()["topics"][topic]["subscribers"]

    def metrics(self):
        """GET /metrics as {series: value} for the unlabelled series."""
        r = self.get("/metrics")
        assert r.status_code == 200, (r.status_code, r.text[:300])
        out = {}
        for line in r.text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
        return out

    def rss_bytes(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    # -- WebSocket -----------------------------------------------------------

    def ws(self, **kw):
        """A `websockets` sync client connected to /ws."""
        kw.setdefault("open_timeout", REPLY_DEADLINE)
        kw.setdefault("max_size", None)
        kw.setdefault("compression", None)
        kw.setdefault("ping_interval", None)
        kw.setdefault("proxy", None)
        return ws_client.connect(self.ws_url, **kw)

    def raw_ws(self, rcvbuf=None):
        return RawWebSocket(self.host, self.port, rcvbuf=rcvbuf)

    # -- life cycle ----------------------------------------------------------

    def terminate(self, deadline_s=30.0):
        """SIGTERM, then wait for the exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server still running {deadline_s}s after SIGTERM")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.http.close()
        except Exception:
            pass


# -- WebSocket helpers (over the `websockets` client) ---------------------------


def recv_json(ws, deadline_s=REPLY_DEADLINE):
    return json.loads(ws.recv(timeout=deadline_s))


def recv_until(ws, predicate, deadline_s=REPLY_DEADLINE, what="a matching message"):
    """Receives frames until one satisfies predicate; returns (match, frames before it)."""
    end = time.monotonic() + deadline_s
    skipped = []
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {what} within {deadline_s}s; got {skipped[-5:]}")
        try:
            text = ws.recv(timeout=remaining)
        except TimeoutError:
            continue
        msg = json.loads(text)
        if predicate(msg):
            return msg, skipped
        skipped.append(msg)


def publish_ws(ws, topic, payload_text, request_id=None, deadline_s=REPLY_DEADLINE):
    """Publishes a payload given as JSON text (sent exactly as written) and waits
    for its reply (ack or error) by request_id. Returns (reply, message id)."""
    request_id = request_id or uuid.uuid4().hex
    msg_id = str(uuid.uuid4())
    frame = (
        '{"type":"publish","topic":%s,"request_id":%s,"message":{"id":"%s","payload":%s}}'
        % (json.dumps(topic), json.dumps(request_id), msg_id, payload_text)
    )
    ws.send(frame)
    reply, _ = recv_until(
        ws,
        lambda m: m.get("request_id") == request_id and m.get("type") in ("ack", "error"),
        deadline_s,
        f"reply to publish {request_id}",
    )
    return reply, msg_id


def subscribe_frame(topic, request_id="s1", **extra):
    body = {"type": "subscribe", "topic": topic, "client_id": "pytest", "request_id": request_id}
    body.update(extra)
    return json.dumps(body)


def raw_payload(frame_text):
    """The exact text of `"payload":` inside an event or history entry frame."""
    key = '"payload":'
    i = frame_text.index(key) + len(key)
    while frame_text[i] in " \t\r\n":
        i += 1
    _, end = json.JSONDecoder().raw_decode(frame_text, i)
    return frame_text[i:end]


# -- a raw-socket WebSocket client ----------------------------------------------


class Closed(Exception):
    """The server closed TCP (EOF or reset) before a complete frame."""


class RawWebSocket:
    """A minimal RFC 6455 client on a plain socket: the test decides exactly
    when bytes are read (nothing runs in the background), and may shrink the
    receive buffer before connecting."""

    def __init__(self, host, port, rcvbuf=None, timeout=REPLY_DEADLINE):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.eof = False
        self.reset = False
        # A slow reader: at most read_chunk bytes per recv, then a pause.
        self.read_chunk = 65536
        self.read_pause = 0.0
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        end = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self._fill(end)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 101"), head
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        assert accept.encode() in head, head

    def _fill(self, end):
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete frame before the deadline")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(self.read_chunk)
        except (ConnectionResetError, BrokenPipeError) as e:
            self.eof = self.reset = True
            raise Closed(f"connection reset: {e}")
        if not chunk:
            self.eof = True
            raise Closed("EOF")
        self.buf += chunk
        if self.read_pause:
            time.sleep(self.read_pause)

    def _need(self, n, end):
        while len(self.buf) < n:
            self._fill(end)

    @staticmethod
    def encode_frame(opcode, payload):
        """One masked client frame (FIN set) as bytes, ready to send."""
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + masked

    def send_frame(self, opcode, payload):
        self.sock.sendall(self.encode_frame(opcode, payload))

    def send_texts_at_once(self, texts):
        """Many text frames concatenated and handed to the kernel in one sendall
        (one write), so they reach the server as one burst."""
        self.sock.sendall(b"".join(self.encode_frame(0x1, t.encode()) for t in texts))

    def peek(self, limit=1 << 22):
        """What the kernel holds for us, without consuming it (no window opens),
        plus what was already buffered here; never blocks."""
        try:
            pending = self.sock.recv(limit, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pending = b""
        except OSError:
            pending = b""
        return self.buf + pending

    def send_text(self, text):
        self.send_frame(0x1, text.encode())

    def recv_frame(self, deadline_s=REPLY_DEADLINE):
        """One frame: (opcode, fin, payload bytes)."""
        end = time.monotonic() + deadline_s
        self._need(2, end)
        b0, b1 = self.buf[0], self.buf[1]
        n, off = b1 & 0x7F, 2
        if n == 126:
            self._need(4, end)
            n, off = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            self._need(10, end)
            n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
        assert not b1 & 0x80, "server frames must not be masked"
        self._need(off + n, end)
        payload, self.buf = self.buf[off : off + n], self.buf[off + n :]
        return b0 & 0x0F, bool(b0 & 0x80), payload

    def recv_message(self, deadline_s=REPLY_DEADLINE):
        """The next message: ("text", str) or ("close", code, reason). Pings
        are answered, pongs skipped, fragments joined."""
        end = time.monotonic() + deadline_s
        parts, first = [], None
        while True:
            opcode, fin, payload = self.recv_frame(max(end - time.monotonic(), 0.001))
            if opcode == 0x9:
                self.send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return ("close", code, payload[2:].decode("utf-8", "replace"))
            if opcode != 0x0:
                first = opcode
            parts.append(payload)
            if fin:
                assert first == 0x1, f"unexpected opcode {first}"
                return ("text", b"".join(parts).decode("utf-8"))

    def recv_json(self, deadline_s=REPLY_DEADLINE):
        kind, *rest = self.recv_message(deadline_s)
        assert kind == "text", (kind, rest)
        return json.loads(rest[0])

    def wait_eof(self, deadline_s=REPLY_DEADLINE):
        """After a Close frame: reply, then expect TCP EOF (or reset) in time."""
        try:
            self.send_frame(0x8, b"")
        except OSError:
            pass
        end = time.monotonic() + deadline_s
        try:
            while True:
                self._fill(end)
                self.buf = b""
        except Closed:
            return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# -- raw HTTP -------------------------------------------------------------------


def raw_http(host, port, request, deadline_s=REPLY_DEADLINE):
    """Sends `request` (bytes, exactly as given) on a fresh socket and reads one
    answer: (status, {lower-case header: value}, body bytes). Reads the body by
    Content-Length, or to EOF without one."""
    end = time.monotonic() + deadline_s
    with socket.create_connection((host, port), timeout=deadline_s) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            sock.settimeout(max(end - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before a whole answer head: {data!r}")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        while True:
            if length is not None and len(body) >= int(length):
                return status, headers, body[: int(length)]
            sock.settimeout(max(end - time.monotonic(), 0.001))
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                if length is None:
                    return status, headers, body
                raise AssertionError(f"answer body cut short: {head!r} {body!r}")
            body += chunk


# -- the server's side of a TCP connection, from /proc/net/tcp -------------------------


def server_send_queue(server_port, client_port):
    """Bytes the server's socket for this connection holds unacknowledged
    (tx_queue in /proc/net/tcp: written by the server, not yet taken by the
    client), or None when no such socket is listed (IPv4 only)."""
    want_local, want_remote = f"{server_port:04X}", f"{client_port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, queues = fields[1], fields[2], fields[4]
            if local.endswith(":" + want_local) and remote.endswith(":" + want_remote):
                return int(queues.split(":")[0], 16)
    return None


class SendQueueWatch:
    """Polls server_send_queue every `interval` seconds in a thread and records
    each change as (monotonic time, bytes). When the client stops reading, the
    queue grows fast while the buffers fill, then sits still: stall_time() is
    when it first sat still, i.e. when the server's writes first blocked."""

    def __init__(self, server_port, client_port, interval=0.01):
        self.ports = (server_port, client_port)
        self.interval = interval
        self.changes = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            value = server_send_queue(*self.ports)
            if value is not None and (not self.changes or self.changes[-1][1] != value):
                self.changes.append((time.monotonic(), value))
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self.stopped_at = time.monotonic()

    def stall_time(self, hold=0.2):
        """The first moment the queue held a non-zero value unchanged for
        `hold` seconds, or None."""
        end = getattr(self, "stopped_at", time.monotonic())
        for i, (t, value) in enumerate(self.changes):
            next_t = self.changes[i + 1][0] if i + 1 < len(self.changes) else end
            if value > 0 and next_t - t >= hold:
                return t
        return None
