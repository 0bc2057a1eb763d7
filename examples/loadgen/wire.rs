//! The protocol's messages as loadgen writes and reads them.
//!
//! Events and acks arrive by the million, so they are recognized by a fast path that reads only
//! the fields loadgen needs straight from the text the server writes
//! (`{"type":"event","topic":"T","message":{"id":"...","payload":{"p":0,"seq":1,"t":2,...`);
//! anything that does not match it goes through `serde_json`, so the result never depends on
//! the fast path matching.

use std::borrow::Cow;
use std::fmt::Write;

use serde_json::Value;

/// A message from the server, reduced to what loadgen counts.
#[derive(Debug, PartialEq)]
pub enum Incoming<'a> {
    /// An event whose payload loadgen wrote: publisher index, sequence number, send time.
    Event {
        topic: Cow<'a, str>,
        publisher: u64,
        seq: u64,
        sent_ns: u64,
    },
    /// An ack; `request_id` when it was one of loadgen's numeric ids.
    Ack { request_id: Option<u64> },
    Error {
        code: String,
        request_id: Option<u64>,
    },
    /// pong, info, or an event that loadgen did not publish.
    Other,
    /// Not JSON, or not an object with a `type`.
    Malformed,
}

/// Classifies one text frame.
pub fn classify(text: &str) -> Incoming<'_> {
    fast_event(text)
        .or_else(|| fast_ack(text))
        .unwrap_or_else(|| slow(text))
}

fn fast_event(text: &str) -> Option<Incoming<'_>> {
    let rest = text.strip_prefix(r#"{"type":"event","topic":""#)?;
    // Topic names cannot contain a quote or a backslash, so the first quote ends the name.
    let (topic, rest) = rest.split_once('"')?;
    const PAYLOAD: &str = r#""payload":{"p":"#;
    let rest = &rest[rest.find(PAYLOAD)? + PAYLOAD.len()..];
    let (publisher, rest) = number(rest)?;
    let (seq, rest) = number(rest.strip_prefix(r#","seq":"#)?)?;
    let (sent_ns, _) = number(rest.strip_prefix(r#","t":"#)?)?;
    Some(Incoming::Event {
        topic: Cow::Borrowed(topic),
        publisher,
        seq,
        sent_ns,
    })
}

fn fast_ack(text: &str) -> Option<Incoming<'_>> {
    let rest = text.strip_prefix(r#"{"type":"ack","request_id":""#)?;
    let (id, rest) = number(rest)?;
    rest.starts_with('"').then_some(Incoming::Ack {
        request_id: Some(id),
    })
}

/// A run of ASCII digits at the start of `text`, and what follows it.
fn number(text: &str) -> Option<(u64, &str)> {
    let end = text
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(text.len());
    Some((text[..end].parse().ok()?, &text[end..]))
}

fn slow(text: &str) -> Incoming<'_> {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Incoming::Malformed;
    };
    let request_id = || value["request_id"].as_str().and_then(|s| s.parse().ok());
    match value["type"].as_str() {
        Some("event") => {
            let payload = &value["message"]["payload"];
            let field = |name: &str| payload[name].as_u64();
            match (
                value["topic"].as_str(),
                field("p"),
                field("seq"),
                field("t"),
            ) {
                (Some(topic), Some(publisher), Some(seq), Some(sent_ns)) => Incoming::Event {
                    topic: Cow::Owned(topic.to_string()),
                    publisher,
                    seq,
                    sent_ns,
                },
                _ => Incoming::Other,
            }
        }
        Some("ack") => Incoming::Ack {
            request_id: request_id(),
        },
        Some("error") => Incoming::Error {
            code: value["error"]["code"]
                .as_str()
                .unwrap_or("(no code)")
                .to_string(),
            request_id: request_id(),
        },
        Some(_) => Incoming::Other,
        None => Incoming::Malformed,
    }
}

pub fn subscribe(topic: &str, client_id: &str) -> String {
    format!(
        r#"{{"type":"subscribe","topic":"{topic}","client_id":"{client_id}","request_id":"sub"}}"#
    )
}

pub fn topic_body(name: &str) -> String {
    format!(r#"{{"name":"{name}"}}"#)
}

/// Writes the publish requests of one publisher: request id = sequence number, a fresh UUID v4
/// per message, payload `{"p":PUBLISHER,"seq":N,"t":SENT_NS,"pad":"xx.."}`.
pub struct Publisher {
    topic: String,
    index: usize,
    pad: String,
    /// xorshift64* state for the message ids (a syscall per UUID would cost more than the
    /// rest of the message).
    rng: u64,
}

impl Publisher {
    /// `payload_bytes` is the payload's approximate size; the pad makes up what the numbers
    /// leave.
    pub fn new(topic: String, index: usize, payload_bytes: usize) -> Publisher {
        const FIXED: usize = r#"{"p":,"seq":,"t":,"pad":""}"#.len() + 24;
        let seed = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
        Publisher {
            topic,
            index,
            pad: "x".repeat(payload_bytes.saturating_sub(FIXED)),
            rng: seed,
        }
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn publish(&mut self, seq: u64, sent_ns: u64) -> String {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.next_random().to_le_bytes());
        bytes[8..].copy_from_slice(&self.next_random().to_le_bytes());
        let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
        let mut out = String::with_capacity(160 + self.topic.len() + self.pad.len());
        let _ = write!(
            out,
            r#"{{"type":"publish","topic":"{}","request_id":"{seq}","message":{{"id":"{}","payload":{{"p":{},"seq":{seq},"t":{sent_ns},"pad":"{}"}}}}}}"#,
            self.topic,
            id.hyphenated(),
            self.index,
            self.pad
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_and_slow_paths_agree() {
        let event = r#"{"type":"event","topic":"lg-1","message":{"id":"x","payload":{"p":3,"seq":42,"t":99,"pad":""}},"ts":"t"}"#;
        let expected = Incoming::Event {
            topic: Cow::Borrowed("lg-1"),
            publisher: 3,
            seq: 42,
            sent_ns: 99,
        };
        assert_eq!(fast_event(event), Some(expected));
        assert_eq!(slow(event), classify(event));
        let ack = r#"{"type":"ack","request_id":"17","status":"ok","topic":"a","ts":"t"}"#;
        assert_eq!(classify(ack), slow(ack));
        let reordered =
            r#"{"topic":"lg-1","type":"event","message":{"payload":{"seq":1,"t":2,"p":0}}}"#;
        assert!(matches!(
            classify(reordered),
            Incoming::Event { seq: 1, .. }
        ));
    }
}
