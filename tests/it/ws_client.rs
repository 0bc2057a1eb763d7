//! A blocking WebSocket client over tungstenite, with the protocol's requests as methods.
//!
//! Every read has a deadline ([`DEADLINE`]), so a message that never comes fails the test
//! instead of hanging it. "Nothing else arrived" is never checked with a timeout: when a ping's
//! pong is the very next message, nothing was queued before it ([`WsClient::assert_nothing_pending`]).

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};
use uuid::Uuid;

use crate::harness::DEADLINE;
use crate::record;

/// First byte of a final text frame: FIN bit and opcode 0x1 (RFC 6455 5.2).
pub const TEXT_FRAME: u8 = 0x81;

/// First byte of a final frame with opcode 0x3, "reserved for further non-control frames"
/// (RFC 6455 5.2).
pub const RESERVED_OPCODE_FRAME: u8 = 0x83;

/// One WebSocket connection to the server's `/ws`.
pub struct WsClient {
    socket: WebSocket<TcpStream>,
    /// The `client_id` this client's subscriptions carry.
    client_id: String,
    /// Numbers the `request_id`s, so each reply can be matched to its request.
    requests_sent: u64,
    /// The connection's name in the recorded traffic ([`record`]).
    conn: String,
}

impl WsClient {
    /// Connects to `/ws` with a client_id of its own; panics if the upgrade fails.
    pub fn connect(addr: SocketAddr) -> WsClient {
        WsClient::connect_as(addr, &format!("it-{}", Uuid::new_v4()))
    }

    /// Connects to `/ws` with the given `client_id`.
    pub fn connect_as(addr: SocketAddr, client_id: &str) -> WsClient {
        let mut client = WsClient::try_connect(addr, "/ws", &[])
            .unwrap_or_else(|error| panic!("WebSocket upgrade failed: {error}"));
        client.client_id = client_id.to_owned();
        client
    }

    /// Attempts the upgrade on `path` (which may carry a query) with extra request `headers`.
    pub fn try_connect(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> tungstenite::Result<WsClient> {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_write_timeout(Some(DEADLINE)).unwrap();
        let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let recorded_request = record::enabled().then(|| handshake_text(&request));
        let outcome = tungstenite::client::client(request, stream);
        if let Some(request) = recorded_request {
            let response = match &outcome {
                Ok((_, response)) => Some(response_text(response, None)),
                Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                    Some(response_text(response, response.body().as_deref()))
                }
                _ => None,
            };
            if let Some(response) = response {
                record::http(
                    "ws_handshake",
                    request.as_bytes(),
                    response.as_bytes(),
                    false,
                );
            }
        }
        match outcome {
            Ok((socket, _response)) => Ok(WsClient {
                socket,
                client_id: format!("it-{}", Uuid::new_v4()),
                requests_sent: 0,
                conn: record::new_connection(),
            }),
            Err(HandshakeError::Failure(error)) => Err(error),
            Err(HandshakeError::Interrupted(_)) => {
                panic!("no handshake response within {DEADLINE:?}")
            }
        }
    }

    /// Sends `value` as one text frame.
    pub fn send_json(&mut self, value: &Value) {
        self.send_message(Message::text(value.to_string()));
    }

    /// Sends any message (text that is not JSON, binary, ...).
    pub fn send_message(&mut self, message: Message) {
        match &message {
            Message::Text(text) => record::ws_text(&self.conn, "sent", text.as_str()),
            Message::Binary(_) => record::ws_opaque(&self.conn, "binary"),
            _ => {}
        }
        self.socket.send(message).unwrap();
    }

    /// Writes one hand-built frame of at most 125 bytes straight to the socket, bypassing
    /// tungstenite's checks; `masked` is what RFC 6455 5.3 requires of a client.
    pub fn send_raw_frame(&mut self, first_byte: u8, payload: &[u8], masked: bool) {
        const MASKING_KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
        let length = u8::try_from(payload.len())
            .ok()
            .filter(|length| *length < 126)
            .expect("only short frames are built by hand");
        let mut frame = vec![first_byte];
        if masked {
            frame.push(0x80 | length);
            frame.extend(MASKING_KEY);
            let masked_payload = payload.iter().zip(MASKING_KEY.iter().cycle());
            frame.extend(masked_payload.map(|(byte, key)| byte ^ key));
        } else {
            frame.push(length);
            frame.extend(payload);
        }
        // A masked final text frame is a request like any other; anything else is not.
        match std::str::from_utf8(payload) {
            Ok(text) if first_byte == TEXT_FRAME && masked => {
                record::ws_text(&self.conn, "sent", text)
            }
            _ => record::ws_opaque(&self.conn, "raw"),
        }
        self.socket.get_mut().write_all(&frame).unwrap();
    }

    /// Writes `bytes` straight to the socket: hand-built frames of any size, or a part of one.
    pub fn send_raw_bytes(&mut self, bytes: &[u8]) {
        record::ws_opaque(&self.conn, "raw");
        self.socket.get_mut().write_all(bytes).unwrap();
    }

    /// The next message of any kind, or the error that ended the connection, without panicking.
    pub fn try_recv_message(&mut self) -> tungstenite::Result<Message> {
        self.read()
    }

    /// The next message from the socket; every read goes through here, so that every text
    /// frame received is recorded.
    fn read(&mut self) -> tungstenite::Result<Message> {
        let message = self.socket.read();
        if let Ok(Message::Text(text)) = &message {
            record::ws_text(&self.conn, "received", text.as_str());
        }
        message
    }

    /// The next message of any kind, including pings (tungstenite queues their pongs).
    pub fn recv_message(&mut self) -> Message {
        self.read()
            .unwrap_or_else(|error| panic!("no WebSocket message arrived: {error}"))
    }

    /// The next text frame, passing over pings and pongs; panics on anything else.
    pub fn recv_text(&mut self) -> String {
        loop {
            match self.recv_message() {
                Message::Text(text) => return text.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {}", describe(&other)),
            }
        }
    }

    /// The next text frame as JSON, checked to carry `ts` (every server message
    /// does, so every test checks it).
    pub fn recv_json(&mut self) -> Value {
        let text = self.recv_text();
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("server sent invalid JSON ({error}): {text}"));
        assert_timestamp(&value);
        value
    }

    /// Reads until a close frame and returns its code; panics on a data frame before it.
    pub fn expect_close(&mut self) -> CloseCode {
        loop {
            match self.recv_message() {
                Message::Close(Some(frame)) => return frame.code,
                Message::Close(None) => panic!("close frame without a status code"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a close frame, got {}", describe(&other)),
            }
        }
    }

    /// Performs the closing handshake (RFC 6455 7.1.2): sends a close frame, then reads until
    /// the server has answered it and closed the TCP connection.
    pub fn close(&mut self) {
        self.socket.close(None).unwrap();
        loop {
            match self.read() {
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed) => return,
                Err(error) => panic!("closing handshake failed: {error}"),
            }
        }
    }

    /// Starts the closing handshake and reads until the connection ends, ignoring every error
    /// (the server may have closed first).
    pub fn close_quietly(&mut self) {
        if self.socket.close(None).is_err() {
            return;
        }
        while self.read().is_ok() {}
    }

    /// Reads (and discards) until the server ends the connection in any way: close frame,
    /// EOF or reset. Panics if the connection is still open after [`DEADLINE`].
    pub fn expect_connection_ended(&mut self) {
        loop {
            match self.read() {
                Ok(Message::Close(_)) => return,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(error))
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    panic!("the server kept the connection open for {DEADLINE:?}")
                }
                Err(_) => return,
            }
        }
    }

    /// Sends `request` with a fresh `request_id` and returns the reply, checked to echo it.
    pub fn request(&mut self, mut request: Value) -> Value {
        self.requests_sent += 1;
        let request_id = format!("r{}", self.requests_sent);
        request["request_id"] = json!(request_id);
        self.send_json(&request);
        let reply = self.recv_json();
        assert_eq!(
            reply["request_id"], request_id,
            "reply {reply} does not answer {request}"
        );
        reply
    }

    /// Subscribes to `topic` (replaying `last_n` events if given) and checks the ack.
    pub fn subscribe(&mut self, topic: &str, last_n: Option<u64>) -> Value {
        let mut request = json!({"type": "subscribe", "topic": topic, "client_id": self.client_id});
        if let Some(last_n) = last_n {
            request["last_n"] = json!(last_n);
        }
        let reply = self.request(request);
        assert_ack(&reply, topic);
        reply
    }

    /// Subscribes to `topic` resuming after event `since_seq` of `epoch` and checks
    /// the ack, which must say whether the events after `since_seq` were `recovered`.
    pub fn subscribe_since(&mut self, topic: &str, since_seq: u64, epoch: &str) -> Value {
        let request = json!({
            "type": "subscribe",
            "topic": topic,
            "client_id": self.client_id,
            "since_seq": since_seq,
            "epoch": epoch,
        });
        let reply = self.request(request);
        assert_ack(&reply, topic);
        assert!(
            reply["recovered"].is_boolean(),
            "a resuming subscribe ack without a boolean `recovered`: {reply}"
        );
        reply
    }

    /// Unsubscribes from `topic` and checks the ack.
    pub fn unsubscribe(&mut self, topic: &str) {
        let request = json!({"type": "unsubscribe", "topic": topic, "client_id": self.client_id});
        let reply = self.request(request);
        assert_ack(&reply, topic);
    }

    /// Publishes `payload` to `topic` under a new id, checks the ack and returns the id.
    /// Only for a connection not subscribed to `topic` (else its own event may come first).
    pub fn publish(&mut self, topic: &str, payload: Value) -> String {
        let id = Uuid::new_v4().to_string();
        let reply = self.request(publish_request(topic, &id, payload));
        assert_ack(&reply, topic);
        id
    }

    /// Publishes `payload` to `topic` under a new id, checks the ack and returns the id with
    /// the `seq` the ack gave the message. Same caveat as [`WsClient::publish`].
    pub fn publish_numbered(&mut self, topic: &str, payload: Value) -> (String, u64) {
        let id = Uuid::new_v4().to_string();
        let reply = self.request(publish_request(topic, &id, payload));
        assert_ack(&reply, topic);
        (id, seq_field(&reply))
    }

    /// Publishes `{"seq": n}` for every `n` in `range`.
    pub fn publish_sequence(&mut self, topic: &str, range: std::ops::Range<u64>) {
        for seq in range {
            self.publish(topic, json!({ "seq": seq }));
        }
    }

    /// Pings and checks that the pong is the next message.
    pub fn ping(&mut self) {
        let reply = self.request(json!({"type": "ping"}));
        assert_eq!(reply["type"], "pong", "ping answered by {reply}");
    }

    /// Proves nothing was queued for this client before now: a ping's pong comes next.
    pub fn assert_nothing_pending(&mut self) {
        self.ping();
    }

    /// The next message, checked to be an event of `topic`; returns its `message` object.
    pub fn recv_event(&mut self, topic: &str) -> Value {
        let event = self.recv_json();
        assert_eq!(event["type"], "event", "expected an event, got {event}");
        assert_eq!(event["topic"], topic, "event from the wrong topic: {event}");
        event["message"].clone()
    }

    /// The next message, checked to be an event of `topic` with a `seq`; returned
    /// whole.
    pub fn recv_numbered_event(&mut self, topic: &str) -> Value {
        let event = self.recv_json();
        assert_eq!(event["type"], "event", "expected an event, got {event}");
        assert_eq!(event["topic"], topic, "event from the wrong topic: {event}");
        seq_field(&event);
        event
    }

    /// The payloads of the next `count` events of `topic`.
    pub fn recv_payloads(&mut self, topic: &str, count: usize) -> Vec<Value> {
        (0..count)
            .map(|_| self.recv_event(topic)["payload"].clone())
            .collect()
    }

    /// The `seq` of the next `count` events of `topic`.
    pub fn recv_sequence(&mut self, topic: &str, count: usize) -> Vec<u64> {
        self.recv_payloads(topic, count).iter().map(seq).collect()
    }

    /// The `seq` of every event of `topic` up to and including the one marked `"last": true`.
    pub fn recv_sequence_until_last(&mut self, topic: &str) -> Vec<u64> {
        let mut received = Vec::new();
        loop {
            let payload = self.recv_event(topic)["payload"].clone();
            received.push(seq(&payload));
            if payload["last"] == true {
                return received;
            }
        }
    }
}

/// A client frame of any length (RFC 6455 5.2): `first_byte` (FIN, RSV and opcode bits), the
/// payload length in 7, 7+16 or 7+64 bits, and the payload, masked if `masked`.
pub fn client_frame(first_byte: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    const MASKING_KEY: [u8; 4] = [0x5a, 0x11, 0xc3, 0x7e];
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut frame = vec![first_byte];
    match payload.len() {
        length @ 0..=125 => frame.push(mask_bit | length as u8),
        length @ 126..=0xffff => {
            frame.push(mask_bit | 126);
            frame.extend((length as u16).to_be_bytes());
        }
        length => {
            frame.push(mask_bit | 127);
            frame.extend((length as u64).to_be_bytes());
        }
    }
    if masked {
        frame.extend(MASKING_KEY);
        let masked_payload = payload.iter().zip(MASKING_KEY.iter().cycle());
        frame.extend(masked_payload.map(|(byte, key)| byte ^ key));
    } else {
        frame.extend(payload);
    }
    frame
}

/// A `publish` request without `request_id`.
pub fn publish_request(topic: &str, id: &str, payload: Value) -> Value {
    json!({"type": "publish", "topic": topic, "message": {"id": id, "payload": payload}})
}

/// Checks that `reply` is a successful ack for `topic`.
pub fn assert_ack(reply: &Value, topic: &str) {
    assert_eq!(reply["type"], "ack", "expected an ack, got {reply}");
    assert_eq!(reply["status"], "ok", "ack not ok: {reply}");
    assert_eq!(reply["topic"], topic, "ack for the wrong topic: {reply}");
}

/// Checks that `reply` is an error with `code` and a message.
pub fn assert_error(reply: &Value, code: &str) {
    assert_eq!(reply["type"], "error", "expected an error, got {reply}");
    assert_eq!(reply["error"]["code"], code, "wrong error code: {reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "error without a message: {reply}");
}

/// Checks that `message` carries `ts` as RFC 3339 UTC with milliseconds, as
/// `2026-11-27T06:24:44.123Z`.
pub fn assert_timestamp(message: &Value) {
    const SHAPE: &[u8] = b"dddd-dd-ddTdd:dd:dd.dddZ";
    let ts = message["ts"].as_str().unwrap_or_default().as_bytes();
    let well_formed = ts.len() == SHAPE.len()
        && SHAPE.iter().zip(ts).all(|(shape, byte)| match shape {
            b'd' => byte.is_ascii_digit(),
            _ => shape == byte,
        });
    assert!(well_formed, "`ts` missing or malformed in {message}");
}

/// `message` without its `ts`, for comparing whole messages.
pub fn without_ts(mut message: Value) -> Value {
    message.as_object_mut().unwrap().remove("ts");
    message
}

/// The `seq` number of a payload built by the sequence helpers.
pub fn seq(payload: &Value) -> u64 {
    payload["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("payload without seq: {payload}"))
}

/// The `seq` field a server message carries: an event's number, a publish ack's,
/// the last one of a topic in a subscribe ack.
pub fn seq_field(message: &Value) -> u64 {
    message["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer `seq` in {message}"))
}

/// The `epoch` string of a subscribe ack.
pub fn epoch_field(ack: &Value) -> String {
    let epoch = ack["epoch"].as_str().unwrap_or_default();
    assert!(!epoch.is_empty(), "no `epoch` string in {ack}");
    epoch.to_owned()
}

/// A handshake request as text, for the recording: request line and headers.
fn handshake_text(request: &tungstenite::handshake::client::Request) -> String {
    let mut text = format!(
        "GET {} HTTP/1.1\r\n",
        request.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    for (name, value) in request.headers() {
        text.push_str(&format!(
            "{name}: {}\r\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text.push_str("\r\n");
    text
}

/// A handshake response as text, for the recording: status line, headers and `body`.
fn response_text<T>(response: &tungstenite::http::Response<T>, body: Option<&[u8]>) -> String {
    let status = response.status();
    let mut text = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in response.headers() {
        text.push_str(&format!(
            "{name}: {}\r\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text.push_str("\r\n");
    text.push_str(&String::from_utf8_lossy(body.unwrap_or_default()));
    text
}

/// A short description of a message, since a whole large event would flood the output.
fn describe(message: &Message) -> String {
    let text = format!("{message:?}");
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}
