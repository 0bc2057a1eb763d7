//! Fuzzes `ClientRequest::parse`, which reads and validates one WebSocket text frame from a
//! client (subscribe, unsubscribe, publish, ping).
//!
//! Every input is used twice:
//! 1. as the frame's text itself, when the bytes are UTF-8 (a WebSocket text frame always is);
//! 2. as the seed of a generator (`arbitrary::Unstructured`) that writes a JSON request: fields of
//!    the protocol and others, each holding either a well-formed value for that field or any JSON
//!    value at all (every JSON type in every field: null, booleans, integers at the edges, floats,
//!    odd number spellings, strings with escapes and lone surrogates, arrays, objects, nesting up
//!    to thousands deep), duplicated keys, and sometimes a token that is not JSON.
//!
//! Besides "never panics" (and no stack overflow: deep inputs run on a thread with the stack of
//! a session's threads, `SESSION_STACK_SIZE`), it checks:
//! - a rejection always has a non-empty message;
//! - an accepted request was a JSON object (by a JSON validator written here, independently of
//!   serde_json), its topic follows the naming rule (1 to 128 of A-Z a-z 0-9 _ - . :, not . or
//!   ..), its client_id is not empty, a publish's message id is a UUID, kept in canonical form;
//! - a publish's payload is the client's bytes verbatim, and an event carrying it, serialized as
//!   the server does, is valid JSON;
//! - where serde_json can read the input as a tree, the accepted fields are the ones it holds;
//! - the readability rule for payloads, decided by checks written here without serde_json: when
//!   an input is a publish well formed in every part but its payload (a JSON object, type
//!   "publish", a valid topic, a string request_id if any, a message object with a UUID id, no
//!   known field twice, no key with a lone surrogate), it is accepted, with the payload's bytes
//!   verbatim, exactly when the payload is readable: no lone surrogate escape (in a key or a
//!   value), nesting within 124 levels of arrays and objects, every number within f64's range
//!   (by `f64::from_str`; a number within a hair of f64::MAX may go either way, since
//!   serde_json's own float parsing is not exact there). A third request per input is such a
//!   publish around a generated payload (keys with escapes, surrogate pairs, raw non-ASCII, lone
//!   surrogates, nesting around 124, numbers past f64), and a fourth around the input's text.
//!
//! The checks read the fields of `ClientRequest` (its `Operation`, the payload's `RawValue`) and
//! of `Rejection` directly; they are `pub(crate)` in main.rs, which this crate includes as a
//! module. The oracles themselves (the JSON validator, the readability rule, the topic rule) are
//! written here, independently of the server's parser.
#![no_main]

use arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;

#[path = "../../main.rs"]
#[allow(dead_code, unused_imports, unused_macros, clippy::all)]
mod server;

use server::broker::Replay;
use server::protocol::{ClientRequest, Operation};
use server::ws::SESSION_STACK_SIZE;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check(text, None);
        // The input itself as a payload.
        let payload = text.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
        check(&publish_around(payload), Some(payload));
    }
    let mut u = Unstructured::new(data);
    if let Ok(text) = gen_request(&mut u) {
        check(&text, None);
    }
    let mut u = Unstructured::new(data);
    let mut payload = String::new();
    if gen_value(&mut u, 0, &mut payload).is_ok() {
        check(&publish_around(&payload), Some(&payload));
    }
});

/// A publish, well formed but for its payload, which it holds verbatim.
fn publish_around(payload: &str) -> String {
    format!(
        r#"{{"type":"publish","topic":"fuzz.t","message":{{"id":"9b2f8a4e-1c3d-4e5f-8a6b-7c8d9e0f1a2b","payload":{payload}}}}}"#
    )
}

/// Runs the checks, on a thread with the server's stack size when the input nests deeply.
/// `wrapped` is the payload when `text` is [`publish_around`] it.
fn check(text: &str, wrapped: Option<&str>) {
    let openers = text.bytes().filter(|&b| b == b'[' || b == b'{').count();
    if openers <= 128 {
        check_on_this_thread(text, wrapped);
        return;
    }
    let owned = text.to_owned();
    let wrapped = wrapped.map(str::to_owned);
    let worker = std::thread::Builder::new()
        .stack_size(SESSION_STACK_SIZE)
        .spawn(move || check_on_this_thread(&owned, wrapped.as_deref()))
        .expect("spawn checker thread");
    if let Err(panic) = worker.join() {
        std::panic::resume_unwind(panic);
    }
}

fn check_on_this_thread(text: &str, wrapped: Option<&str>) {
    // The payload accepted, or why the request was refused.
    let outcome: Result<Option<&str>, String> = match ClientRequest::parse(text) {
        Err(rejection) => {
            assert!(
                !rejection.message.is_empty(),
                "empty rejection message for {text:?}: {rejection:?}"
            );
            Err(format!("{rejection:?}"))
        }
        Ok(request) => {
            check_accepted(text, &request);
            Ok(match request.op {
                Operation::Publish { payload, .. } => Some(payload.get()),
                _ => None,
            })
        }
    };
    let payload = publish_payload(text);
    if let Some(wrapped) = wrapped {
        // The checks' own reading of a publish agrees with how it was written.
        if valid_json(wrapped) {
            assert_eq!(
                payload,
                Some(wrapped),
                "publish_payload misread a publish around a JSON payload"
            );
        }
    }
    if let Some(payload) = payload {
        check_readability_rule(text, payload, &outcome);
    }
}

/// The rule for a publish well formed but for its payload: accepted, with the payload verbatim,
/// exactly when the payload is readable.
fn check_readability_rule(text: &str, payload: &str, outcome: &Result<Option<&str>, String>) {
    let verdict = payload_verdict(payload);
    match (verdict, outcome) {
        (Verdict::Readable | Verdict::Either, Ok(accepted)) => assert_eq!(
            *accepted,
            Some(payload),
            "accepted payload is not the payload's bytes verbatim, in {text:?}"
        ),
        (Verdict::Readable, Err(rejection)) => panic!(
            "refused a publish whose payload every client can read ({rejection}): \
             payload {payload:?} in {text:?}"
        ),
        (Verdict::Unreadable(why), Ok(_)) => panic!(
            "accepted a publish whose payload is not readable ({why}): payload {payload:?} in \
             {text:?}"
        ),
        (Verdict::Unreadable(_) | Verdict::Either, Err(_)) => {}
    }
}

fn check_accepted(text: &str, accepted: &ClientRequest<'_>) {
    assert!(
        text.trim_start().starts_with('{'),
        "accepted something other than an object: {text:?}"
    );
    assert!(valid_json(text), "accepted invalid JSON: {text:?}");
    match &accepted.op {
        Operation::Subscribe {
            topic, client_id, ..
        }
        | Operation::Unsubscribe { topic, client_id } => {
            assert_topic(topic, text);
            assert!(
                !client_id.is_empty(),
                "accepted an empty client_id: {text:?}"
            );
        }
        Operation::Publish { topic, id, payload } => {
            let payload = payload.get();
            assert_topic(topic, text);
            assert!(
                uuid::Uuid::try_parse(id).is_ok(),
                "accepted a message id that is not a UUID: {id:?} in {text:?}"
            );
            assert!(
                text.contains(payload),
                "payload is not the client's bytes: {payload:?} from {text:?}"
            );
            check_payload_reserializes(payload, text);
        }
        Operation::Ping => {}
    }
    // Compare with serde_json's own tree where it can build one (it cannot past 128 levels of
    // nesting or for numbers out of f64's range, which a raw payload may hold).
    if let Ok(tree) = serde_json::from_str::<Value>(text) {
        check_against_tree(&tree, accepted, text);
    }
}

fn assert_topic(topic: &str, text: &str) {
    assert!(
        topic_follows_rule(topic),
        "accepted topic {topic:?} breaks the naming rule, from {text:?}"
    );
}

/// The topic naming rule: 1 to 128 characters from A-Z a-z 0-9 _ - . :, and not `.` or `..`
/// (path segments that no URL could reach).
fn topic_follows_rule(topic: &str) -> bool {
    (1..=128).contains(&topic.len())
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Serializes an event around the payload as the server does (serde with a `&RawValue` field)
/// and checks the result is valid JSON, by the validator below and, where it can, by serde_json.
fn check_payload_reserializes(payload: &str, text: &str) {
    #[derive(serde::Serialize)]
    struct EventMessage<'a> {
        id: &'a str,
        payload: &'a RawValue,
    }
    #[derive(serde::Serialize)]
    struct Event<'a> {
        r#type: &'a str,
        topic: &'a str,
        message: EventMessage<'a>,
        ts: &'a str,
    }
    let raw: &RawValue = serde_json::from_str(payload).unwrap_or_else(|e| {
        panic!("accepted payload {payload:?} is not JSON ({e}), from {text:?}")
    });
    let alone = serde_json::to_string(raw).expect("serialize payload");
    assert_eq!(alone, payload, "re-serialized payload differs");
    let event = serde_json::to_string(&Event {
        r#type: "event",
        topic: "t",
        message: EventMessage {
            id: "7f8e2a9c-4b1d-4c3e-9f6a-1b2c3d4e5f60",
            payload: raw,
        },
        ts: "2026-11-27T06:24:44.123Z",
    })
    .expect("serialize event");
    assert!(
        valid_json(&event),
        "event with payload is not valid JSON: {event:?}"
    );
    match serde_json::from_str::<Value>(&event) {
        Ok(tree) => {
            let back = &tree["message"]["payload"];
            let direct: Value = serde_json::from_str(payload).expect("payload parses as a tree");
            assert_eq!(back, &direct, "payload changed on the way through an event");
        }
        Err(e) => {
            // Valid JSON that serde_json still refuses to read as a tree: nesting past its
            // recursion limit, a number past f64's range, or a `\u` escape of a lone UTF-16
            // surrogate (RFC 8259's grammar allows one; I-JSON, RFC 7493, does not). The server
            // forwards such a payload as it came; a strict client cannot read the event.
            let why = e.to_string();
            assert!(
                why.contains("recursion limit")
                    || why.contains("number out of range")
                    || ((why.contains("surrogate")
                        || why.contains("hex escape")
                        || why.contains("unicode code point"))
                        && has_surrogate_escape(payload)),
                "event with payload is unreadable by serde_json ({why}): {event:?}"
            );
        }
    }
}

/// Whether the JSON text holds a `\u` escape of a UTF-16 surrogate (D800 to DFFF).
fn has_surrogate_escape(json: &str) -> bool {
    json.as_bytes().windows(4).any(|w| {
        w[0] == b'\\'
            && w[1] == b'u'
            && w[2].eq_ignore_ascii_case(&b'd')
            && matches!(w[3].to_ascii_lowercase(), b'8'..=b'9' | b'a'..=b'f')
    })
}

fn check_against_tree(tree: &Value, accepted: &ClientRequest<'_>, text: &str) {
    let object = tree
        .as_object()
        .unwrap_or_else(|| panic!("accepted a non-object: {text:?}"));
    let string = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_owned);
    assert_eq!(
        accepted.request_id,
        string("request_id"),
        "request_id differs from the JSON's, in {text:?}"
    );
    let (kind, topic) = match &accepted.op {
        Operation::Subscribe {
            topic,
            client_id,
            replay,
        } => {
            assert_eq!(
                Some(client_id),
                string("client_id").as_ref(),
                "client_id in {text:?}"
            );
            match replay {
                Replay::LastN(n) => {
                    assert!(
                        object.get("since_seq").is_none(),
                        "since_seq ignored in {text:?}"
                    );
                    assert_eq!(
                        object.get("last_n").map_or(Some(0), Value::as_u64),
                        Some(*n),
                        "last_n in {text:?}"
                    );
                }
                Replay::Since { seq, epoch } => {
                    assert!(object.get("last_n").is_none(), "last_n ignored in {text:?}");
                    assert_eq!(object.get("since_seq").and_then(Value::as_u64), Some(*seq));
                    assert_eq!(string("epoch").as_ref(), Some(epoch), "epoch in {text:?}");
                }
            }
            ("subscribe", Some(topic))
        }
        Operation::Unsubscribe { topic, client_id } => {
            assert_eq!(
                Some(client_id),
                string("client_id").as_ref(),
                "client_id in {text:?}"
            );
            ("unsubscribe", Some(topic))
        }
        Operation::Publish { topic, id, payload } => {
            let message = &object["message"];
            // Ids are accepted in any UUID spelling and kept in the canonical one.
            let canonical = message["id"]
                .as_str()
                .and_then(|sent| uuid::Uuid::try_parse(sent).ok())
                .map(|uuid| uuid.hyphenated().to_string());
            assert_eq!(canonical.as_ref(), Some(id), "message.id in {text:?}");
            if let Ok(direct) = serde_json::from_str::<Value>(payload.get()) {
                assert_eq!(message["payload"], direct, "payload in {text:?}");
            }
            ("publish", Some(topic))
        }
        Operation::Ping => ("ping", None),
    };
    assert_eq!(string("type").as_deref(), Some(kind), "type in {text:?}");
    if let Some(topic) = topic {
        assert_eq!(string("topic").as_ref(), Some(topic), "topic in {text:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// A strict JSON (RFC 8259) validator, iterative so that nesting depth costs no stack, written
// without serde_json so that it checks serde_json too.

fn valid_json(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0usize;
    let mut stack: Vec<u8> = Vec::new();
    'value: loop {
        skip_ws(b, &mut i);
        match b.get(i) {
            Some(b'[') => {
                i += 1;
                skip_ws(b, &mut i);
                if b.get(i) == Some(&b']') {
                    i += 1;
                } else {
                    stack.push(b'[');
                    continue 'value;
                }
            }
            Some(b'{') => {
                i += 1;
                skip_ws(b, &mut i);
                if b.get(i) == Some(&b'}') {
                    i += 1;
                } else {
                    stack.push(b'{');
                    if !json_key(b, &mut i) {
                        return false;
                    }
                    continue 'value;
                }
            }
            Some(b'"') => {
                if !json_string(b, &mut i) {
                    return false;
                }
            }
            Some(b't') if b[i..].starts_with(b"true") => i += 4,
            Some(b'f') if b[i..].starts_with(b"false") => i += 5,
            Some(b'n') if b[i..].starts_with(b"null") => i += 4,
            Some(b'-' | b'0'..=b'9') => {
                if !json_number(b, &mut i) {
                    return false;
                }
            }
            _ => return false,
        }
        // After a value: close containers or go on to the next element.
        loop {
            skip_ws(b, &mut i);
            match stack.last() {
                None => return i == b.len(),
                Some(&open) => {
                    let close = if open == b'[' { b']' } else { b'}' };
                    match b.get(i) {
                        Some(b',') => {
                            i += 1;
                            if open == b'{' {
                                skip_ws(b, &mut i);
                                if !json_key(b, &mut i) {
                                    return false;
                                }
                            }
                            continue 'value;
                        }
                        Some(&c) if c == close => {
                            i += 1;
                            stack.pop();
                        }
                        _ => return false,
                    }
                }
            }
        }
    }
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while matches!(b.get(*i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        *i += 1;
    }
}

/// `"key"` then `:`.
fn json_key(b: &[u8], i: &mut usize) -> bool {
    if b.get(*i) != Some(&b'"') || !json_string(b, i) {
        return false;
    }
    skip_ws(b, i);
    if b.get(*i) != Some(&b':') {
        return false;
    }
    *i += 1;
    true
}

fn json_string(b: &[u8], i: &mut usize) -> bool {
    *i += 1; // the opening quote
    loop {
        match b.get(*i) {
            None => return false,
            Some(b'"') => {
                *i += 1;
                return true;
            }
            Some(b'\\') => {
                *i += 1;
                match b.get(*i) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => *i += 1,
                    Some(b'u') => {
                        let hex = b.get(*i + 1..*i + 5);
                        if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                            return false;
                        }
                        *i += 5;
                    }
                    _ => return false,
                }
            }
            Some(&c) if c < 0x20 => return false,
            Some(_) => *i += 1,
        }
    }
}

fn json_number(b: &[u8], i: &mut usize) -> bool {
    let digits = |i: &mut usize| {
        let start = *i;
        while matches!(b.get(*i), Some(b'0'..=b'9')) {
            *i += 1;
        }
        *i > start
    };
    if b.get(*i) == Some(&b'-') {
        *i += 1;
    }
    match b.get(*i) {
        Some(b'0') => *i += 1,
        Some(b'1'..=b'9') => {
            digits(i);
        }
        _ => return false,
    }
    if b.get(*i) == Some(&b'.') {
        *i += 1;
        if !digits(i) {
            return false;
        }
    }
    if matches!(b.get(*i), Some(b'e' | b'E')) {
        *i += 1;
        if matches!(b.get(*i), Some(b'+' | b'-')) {
            *i += 1;
        }
        if !digits(i) {
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------
// The readability rule, decided without serde_json: which inputs are publishes well formed but
// for their payload, and whether a payload is readable. Iterative, like the validator, and each
// function expects text that `valid_json` passed.

/// `MAX_PAYLOAD_DEPTH` in main.rs: the deepest envelope, a history answer, nests a payload in
/// three levels, and serde_json reads 127 nested levels, so a payload may nest 124 (arrays and
/// objects counted).
const MAX_PAYLOAD_DEPTH: usize = 124;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Readable,
    Unreadable(&'static str),
    /// A number within a hair of f64::MAX: `f64::from_str` rounds exactly, serde_json (without
    /// its float_roundtrip feature) does not, and may call `1.7976931348623158e308` out of range.
    Either,
}

/// Whether every client can read the payload back.
fn payload_verdict(payload: &str) -> Verdict {
    if !valid_json(payload) {
        return Verdict::Unreadable("not JSON");
    }
    let b = payload.as_bytes();
    let (mut i, mut depth, mut deepest, mut edge) = (0usize, 0usize, 0usize, false);
    while i < b.len() {
        match b[i] {
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
                i += 1;
            }
            b']' | b'}' => {
                depth -= 1;
                i += 1;
            }
            b'"' => {
                if json_string_value(b, &mut i).is_none() {
                    return Verdict::Unreadable("a lone surrogate escape");
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while matches!(
                    b.get(i),
                    Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                ) {
                    i += 1;
                }
                match number_verdict(&payload[start..i]) {
                    Verdict::Readable => {}
                    Verdict::Either => edge = true,
                    unreadable => return unreadable,
                }
            }
            _ => i += 1,
        }
    }
    if deepest > MAX_PAYLOAD_DEPTH {
        Verdict::Unreadable("nested deeper than 124 levels")
    } else if edge {
        Verdict::Either
    } else {
        Verdict::Readable
    }
}

/// A JSON number (RFC 8259 syntax) against f64's range, by `f64::from_str`.
fn number_verdict(number: &str) -> Verdict {
    let value: f64 = number.parse().expect("Rust reads every JSON number");
    // The number scaled by 1e-10 (the exponent lowered), to see whether it lies by f64::MAX.
    let (mantissa, exponent) = match number.find(['e', 'E']) {
        Some(at) => (&number[..at], &number[at + 1..]),
        None => (number, "0"),
    };
    let exponent = exponent
        .parse::<i64>()
        .unwrap_or(if exponent.starts_with('-') {
            -(1 << 40)
        } else {
            1 << 40
        });
    let scaled: f64 = format!("{mantissa}e{}", exponent - 10)
        .parse()
        .expect("a scaled number parses");
    let edge = 1.797_693_134_862_3e298..=1.797_693_134_862_4e298;
    if edge.contains(&scaled.abs()) {
        Verdict::Either
    } else if value.is_finite() {
        Verdict::Readable
    } else {
        Verdict::Unreadable("a number beyond f64")
    }
}

/// The string at `b[*i]` (its opening quote) unescaped, and `*i` past it; `None` for a `\u`
/// escape of a lone surrogate: a high one (D800-DBFF) not followed at once by an escaped low one
/// (DC00-DFFF), or a low one not preceded by a high one.
fn json_string_value(b: &[u8], i: &mut usize) -> Option<String> {
    let hex4 = |at: usize| -> Option<u32> {
        let h = std::str::from_utf8(b.get(at..at + 4)?).ok()?;
        u32::from_str_radix(h, 16).ok()
    };
    let mut out = Vec::new();
    *i += 1;
    loop {
        match b[*i] {
            b'"' => {
                *i += 1;
                return Some(String::from_utf8(out).expect("a JSON string is UTF-8"));
            }
            b'\\' => {
                let short = match b[*i + 1] {
                    b'"' => Some(b'"'),
                    b'\\' => Some(b'\\'),
                    b'/' => Some(b'/'),
                    b'b' => Some(8),
                    b'f' => Some(12),
                    b'n' => Some(b'\n'),
                    b'r' => Some(b'\r'),
                    b't' => Some(b'\t'),
                    _ => None,
                };
                if let Some(c) = short {
                    out.push(c);
                    *i += 2;
                    continue;
                }
                let unit = hex4(*i + 2)?;
                *i += 6;
                let code = match unit {
                    0xD800..=0xDBFF => {
                        let low = (b.get(*i..*i + 2) == Some(b"\\u"))
                            .then(|| hex4(*i + 2))
                            .flatten()
                            .filter(|low| (0xDC00..=0xDFFF).contains(low))?;
                        *i += 6;
                        0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return None,
                    _ => unit,
                };
                let c = char::from_u32(code).expect("a scalar value");
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            }
            c => {
                out.push(c);
                *i += 1;
            }
        }
    }
}

/// Moves `*i` past the value at `b[*i]`.
fn skip_value(b: &[u8], i: &mut usize) {
    let mut depth = 0usize;
    loop {
        match b[*i] {
            b'"' => {
                json_string(b, i);
            }
            b'[' | b'{' => {
                depth += 1;
                *i += 1;
            }
            b']' | b'}' => {
                depth -= 1;
                *i += 1;
            }
            _ => {
                while !matches!(
                    b.get(*i),
                    None | Some(b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    *i += 1;
                }
            }
        }
        if depth == 0 {
            return;
        }
        skip_ws(b, i);
        if b[*i] == b',' || b[*i] == b':' {
            *i += 1;
            skip_ws(b, i);
        }
    }
}

/// The members of the object that is `text` (keys unescaped, values as text), or `None` when
/// it is not an object or a key holds a lone surrogate (serde_json refuses to read such a key
/// as a field name).
fn members(text: &str) -> Option<Vec<(String, &str)>> {
    let b = text.as_bytes();
    let mut i = 0;
    skip_ws(b, &mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        skip_ws(b, &mut i);
        if b[i] == b'}' {
            return Some(out);
        }
        if b[i] == b',' {
            i += 1;
            skip_ws(b, &mut i);
        }
        let key = json_string_value(b, &mut i)?;
        skip_ws(b, &mut i);
        i += 1; // the colon
        skip_ws(b, &mut i);
        let start = i;
        skip_value(b, &mut i);
        out.push((key, &text[start..i]));
    }
}

/// The string a JSON value holds, when it is a string without lone surrogates.
fn string_value(json: &str) -> Option<String> {
    (json.as_bytes().first() == Some(&b'"'))
        .then(|| json_string_value(json.as_bytes(), &mut 0))
        .flatten()
}

/// A field of an object by its (unescaped) name; `Err` when the name is there twice.
fn field<'a>(object: &[(String, &'a str)], name: &str) -> Result<Option<&'a str>, ()> {
    let mut found = object
        .iter()
        .filter(|(key, _)| key == name)
        .map(|(_, v)| *v);
    match (found.next(), found.next()) {
        (_, Some(_)) => Err(()),
        (value, None) => Ok(value),
    }
}

/// When `text` is a publish well formed in every part but its payload, the payload's text.
fn publish_payload(text: &str) -> Option<&str> {
    if !valid_json(text) {
        return None;
    }
    let request = members(text)?;
    for known in ["request_id", "client_id", "last_n", "since_seq", "epoch"] {
        field(&request, known).ok()?;
    }
    if string_value(field(&request, "type").ok()??)? != "publish" {
        return None;
    }
    let topic = string_value(field(&request, "topic").ok()??)?;
    if !topic_follows_rule(&topic) {
        return None;
    }
    if let Some(request_id) = field(&request, "request_id").ok()? {
        string_value(request_id)?;
    }
    let message = members(field(&request, "message").ok()??)?;
    let id = string_value(field(&message, "id").ok()??)?;
    uuid::Uuid::try_parse(&id).ok()?;
    field(&message, "payload").ok()?
}

// ---------------------------------------------------------------------------------------------
// The structured generator: a JSON request written from the fuzzer's bytes.

const FIELDS: &[&str] = &[
    "type",
    "request_id",
    "topic",
    "client_id",
    "last_n",
    "since_seq",
    "epoch",
    "message",
    "id",
    "payload",
];

const TYPES: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "publish",
    "ping",
    "Subscribe",
    "PUBLISH",
    "",
    " ping",
    "pong",
    "subscribe\u{0}",
];

/// Tokens that are not JSON, or are JSON at its edges.
const ODD_TOKENS: &[&str] = &[
    "NaN",
    "Infinity",
    "-Infinity",
    "undefined",
    "01",
    "1.",
    ".5",
    "+1",
    "-",
    "1e",
    "1e400",
    "-1e400",
    "1e-400",
    "-0",
    "-0.0",
    "0e0",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "1.0",
    "4.0e1",
    "123456789012345678901234567890123456789012345678901234567890",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"\\ud83d\\ude00\"",
    "\"\\u0000\"",
    "\"\\x41\"",
    "\"\t\"",
    "'single'",
    "tru",
    "nul",
    "[",
    "{",
    "]",
    "}",
    ",",
    ":",
    "[1,]",
    "{\"a\":1,}",
    "//c\n1",
    "/*c*/1",
    "\u{feff}{}",
];

fn gen_request(u: &mut Unstructured<'_>) -> ArbResult<String> {
    let mut out = String::new();
    gen_ws(u, &mut out)?;
    out.push('{');
    let shaped = u.ratio(3, 4)?;
    let count = u.int_in_range(0..=if shaped { 4 } else { 10 })?;
    let mut first = true;
    if shaped {
        // A request of one of the protocol's types, each field well formed or anything.
        let kind = *u.choose(&["subscribe", "unsubscribe", "publish", "ping"])?;
        let mut fields = vec!["type", "topic"];
        match kind {
            "subscribe" => {
                fields.push("client_id");
                match u.int_in_range(0..=3)? {
                    0 => fields.push("last_n"),
                    1 => fields.extend(["since_seq", "epoch"]),
                    2 => fields.extend(["last_n", "since_seq", "epoch"]),
                    _ => {}
                }
            }
            "unsubscribe" => fields.push("client_id"),
            "publish" => fields.push("message"),
            _ => {}
        }
        if u.arbitrary()? {
            fields.push("request_id");
        }
        for field in fields {
            if u.ratio(1, 16)? {
                continue; // leave a required field out
            }
            push_key_spelled(u, &mut out, &mut first, field)?;
            if field == "type" && u.ratio(7, 8)? {
                push_json_string(&mut out, kind);
            } else if u.ratio(3, 4)? {
                gen_good_value(u, field, &mut out)?;
            } else {
                gen_value(u, 0, &mut out)?;
            }
        }
    }
    for _ in 0..count {
        let key = gen_key(u)?;
        push_key_spelled(u, &mut out, &mut first, &key)?;
        if u.arbitrary()? {
            gen_good_value(u, &key, &mut out)?;
        } else {
            gen_value(u, 0, &mut out)?;
        }
    }
    out.push('}');
    gen_ws(u, &mut out)?;
    if u.ratio(1, 32)? {
        out.push_str(u.choose(ODD_TOKENS)?);
    }
    Ok(out)
}

fn push_key(out: &mut String, first: &mut bool, key: &str) {
    if !std::mem::take(first) {
        out.push(',');
    }
    push_json_string(out, key);
    out.push(':');
}

fn push_json_string(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("a string serializes"));
}

fn gen_ws(u: &mut Unstructured<'_>, out: &mut String) -> ArbResult<()> {
    for _ in 0..u.int_in_range(0..=2)? {
        out.push(*u.choose(&[' ', '\t', '\n', '\r'])?);
    }
    Ok(())
}

/// Key names that need escapes, or are not ASCII.
const ODD_KEYS: &[&str] = &[
    "a\"b",
    "c\\d",
    "e\nf",
    "\u{0}",
    "\t\r\u{8}\u{c}\u{1f}",
    "/",
    "\u{43a}\u{43b}\u{44e}\u{447}",
    "clé",
    "\u{1F680}",
    "\u{1F600}x\u{10FFFF}",
    "\u{212A}",
    "\u{FFFF}\u{FEFF}",
    "\u{7f}",
    "",
];

fn gen_key(u: &mut Unstructured<'_>) -> ArbResult<String> {
    Ok(match u.int_in_range(0..=7)? {
        0 => u.arbitrary::<String>()?,
        1 => u.choose(FIELDS)?.to_uppercase(),
        2 => (*u.choose(ODD_KEYS)?).to_owned(),
        3 => format!("{}{}", u.choose(ODD_KEYS)?, u.choose(FIELDS)?),
        _ => (*u.choose(FIELDS)?).to_owned(),
    })
}

fn push_key_spelled(
    u: &mut Unstructured<'_>,
    out: &mut String,
    first: &mut bool,
    key: &str,
) -> ArbResult<()> {
    if !std::mem::take(first) {
        out.push(',');
    }
    spell_json_string(u, key, out)?;
    out.push(':');
    Ok(())
}

/// Writes `s` as a JSON string, or (mostly) as serde_json would, or with each character spelled
/// one of the ways JSON allows: raw, a short escape, `\uXXXX` in either case, a surrogate pair;
/// and, rarely, with a lone surrogate escape put in (which makes the string unreadable).
fn spell_json_string(u: &mut Unstructured<'_>, s: &str, out: &mut String) -> ArbResult<()> {
    if !u.ratio(1, 3)? {
        push_json_string(out, s);
        return Ok(());
    }
    let lone_at = if u.ratio(1, 16)? {
        Some(u.int_in_range(0..=s.chars().count())?)
    } else {
        None
    };
    let escape = |out: &mut String, unit: u32, upper: bool| {
        out.push_str(&if upper {
            format!("\\u{unit:04X}")
        } else {
            format!("\\u{unit:04x}")
        })
    };
    let lone = |u: &mut Unstructured<'_>, out: &mut String| -> ArbResult<()> {
        out.push_str(match u.int_in_range(0..=3)? {
            0 => "\\ud800",
            1 => "\\udfff",
            2 => "\\ud83d\\u0041", // a high surrogate, then no low one
            _ => "\\ude00\\ud83d", // a low surrogate before a high one
        });
        Ok(())
    };
    out.push('"');
    for (n, c) in s.chars().enumerate() {
        if lone_at == Some(n) {
            lone(u, out)?;
        }
        let short = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            '\u{8}' => Some("\\b"),
            '\u{c}' => Some("\\f"),
            '/' => Some("\\/"),
            _ => None,
        };
        let must_escape = c < ' ' || c == '"' || c == '\\';
        match (u.int_in_range(0..=3)?, short) {
            (0 | 1, _) if !must_escape => out.push(c),
            (0..=2, Some(short)) => out.push_str(short),
            _ => {
                let upper = u.arbitrary()?;
                let mut units = [0u16; 2];
                for &unit in c.encode_utf16(&mut units).iter() {
                    escape(out, unit.into(), upper);
                }
            }
        }
    }
    if lone_at == Some(s.chars().count()) {
        lone(u, out)?;
    }
    out.push('"');
    Ok(())
}

/// A value that is right, or nearly right, for the field.
fn gen_good_value(u: &mut Unstructured<'_>, field: &str, out: &mut String) -> ArbResult<()> {
    match field {
        "type" => push_json_string(out, u.choose(TYPES)?),
        "topic" => push_json_string(out, &gen_topic(u)?),
        "client_id" | "request_id" | "epoch" => {
            let s = match u.int_in_range(0..=3)? {
                0 => String::new(),
                1 => format!("{:016x}", u.arbitrary::<u64>()?),
                _ => gen_string(u)?,
            };
            push_json_string(out, &s);
        }
        "last_n" | "since_seq" => out.push_str(&match u.int_in_range(0..=3)? {
            0 => u.arbitrary::<u64>()?.to_string(),
            1 => u.int_in_range(0u64..=100)?.to_string(),
            2 => u.arbitrary::<i64>()?.to_string(),
            _ => (*u.choose(ODD_TOKENS)?).to_owned(),
        }),
        "message" => {
            out.push('{');
            let mut first = true;
            if u.ratio(15, 16)? {
                push_key(out, &mut first, "id");
                if u.ratio(3, 4)? {
                    gen_uuid(u, out)?;
                } else {
                    gen_value(u, 0, out)?;
                }
            }
            if u.ratio(15, 16)? {
                push_key(out, &mut first, "payload");
                gen_value(u, 0, out)?;
            }
            for _ in 0..u.int_in_range(0..=2)? {
                let key = gen_key(u)?;
                push_key_spelled(u, out, &mut first, &key)?;
                gen_value(u, 0, out)?;
            }
            out.push('}');
        }
        "id" => gen_uuid(u, out)?,
        _ => gen_value(u, 0, out)?,
    }
    Ok(())
}

/// A topic name: mostly within the rule, at its length edges, or with one character outside it.
fn gen_topic(u: &mut Unstructured<'_>) -> ArbResult<String> {
    const ALPHABET: &[u8] = b"abcXYZ019_-.:";
    let len = match u.int_in_range(0..=4)? {
        0 => *u.choose(&[0usize, 1, 127, 128, 129, 1000])?,
        _ => u.int_in_range(1usize..=12)?,
    };
    let mut topic: String = (0..len)
        .map(|_| u.choose(ALPHABET).map(|&b| b as char))
        .collect::<ArbResult<_>>()?;
    if u.ratio(1, 4)? {
        let c = *u.choose(&[
            '/',
            ' ',
            '*',
            '#',
            'é',
            '\u{0}',
            '\u{1F600}',
            '"',
            '\\',
            '\u{212A}',
        ])?;
        let at = u.int_in_range(0..=topic.len())?;
        if topic.is_char_boundary(at) {
            topic.insert(at, c);
        }
    }
    Ok(topic)
}

fn gen_uuid(u: &mut Unstructured<'_>, out: &mut String) -> ArbResult<()> {
    let id = uuid::Uuid::from_u128(u.arbitrary()?);
    let s = match u.int_in_range(0..=5)? {
        0 => id.simple().to_string(),
        1 => id.braced().to_string(),
        2 => id.urn().to_string(),
        3 => id.hyphenated().to_string().to_uppercase(),
        4 => {
            let mut s = id.hyphenated().to_string();
            s.truncate(u.int_in_range(0..=36)?);
            s
        }
        _ => id.hyphenated().to_string(),
    };
    push_json_string(out, &s);
    Ok(())
}

fn gen_string(u: &mut Unstructured<'_>) -> ArbResult<String> {
    u.arbitrary::<String>()
}

/// Any JSON value (and, rarely, a token that is not one).
fn gen_value(u: &mut Unstructured<'_>, depth: u32, out: &mut String) -> ArbResult<()> {
    let max_choice = if depth >= 6 { 8 } else { 11 };
    match u.int_in_range(0..=max_choice)? {
        0 => out.push_str("null"),
        1 => out.push_str(if u.arbitrary()? { "true" } else { "false" }),
        2 => out.push_str(&u.arbitrary::<i64>()?.to_string()),
        3 => out.push_str(&u.arbitrary::<u64>()?.to_string()),
        4 => {
            let f: f64 = u.arbitrary()?;
            // serde_json writes non-finite floats as null.
            out.push_str(&serde_json::to_string(&f).expect("a float serializes"));
        }
        5 => {
            let s = gen_string(u)?;
            spell_json_string(u, &s, out)?;
        }
        6 => {
            // A string written with \u escapes, lone surrogates included.
            out.push('"');
            for _ in 0..u.int_in_range(0..=4)? {
                let unit: u16 = u.arbitrary()?;
                out.push_str(&format!("\\u{unit:04x}"));
            }
            out.push('"');
        }
        7 => push_json_string(out, &gen_topic(u)?),
        8 => out.push_str(u.choose(ODD_TOKENS)?),
        9 => {
            out.push('[');
            for i in 0..u.int_in_range(0..=4)? {
                if i > 0 {
                    out.push(',');
                }
                gen_value(u, depth + 1, out)?;
            }
            out.push(']');
        }
        10 => {
            out.push('{');
            let mut first = true;
            for _ in 0..u.int_in_range(0..=4)? {
                let key = gen_key(u)?;
                push_key_spelled(u, out, &mut first, &key)?;
                gen_value(u, depth + 1, out)?;
            }
            out.push('}');
        }
        _ => {
            // Deep nesting: arrays or objects, past serde_json's recursion limit of 128.
            let levels = *u.choose(&[64usize, 124, 125, 126, 127, 128, 129, 200, 1000, 5000])?;
            let object = u.arbitrary::<bool>()?;
            for _ in 0..levels {
                out.push_str(if object { "{\"a\":" } else { "[" });
            }
            gen_value(u, 6, out)?;
            for _ in 0..levels {
                out.push(if object { '}' } else { ']' });
            }
        }
    }
    Ok(())
}
