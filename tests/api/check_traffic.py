#!/usr/bin/env python3
"""Checks docs/openapi.json and docs/asyncapi.json against real traffic.

    python3 tests/api/check_traffic.py DIR [--server BIN] [--docs DOCS_DIR]

DIR holds what the Rust integration tests exchanged with the server (cargo test with
PUBSUB_API_RECORD=DIR; tests/it/record.rs writes it). With --server, the checker also starts
that binary itself and asks every route of docs/openapi.json once (with and without an API key),
so that every documented route is seen answered even where the Rust tests never ask it.

WebSocket (docs/asyncapi.json):
  - every frame the server sent validates against the schema of its `type`;
  - every client request is paired with its reply (each request gets exactly one reply, in
    order; its `request_id` is echoed): a request refused with BAD_REQUEST must fail the
    client-message schema, and any other must pass it, except the cases JSON Schema cannot
    express (EXCEPTIONS below, each matched on the server's error message).
REST (docs/openapi.json):
  - every response is found by method, path template and status in the document, its
    Content-Type among the documented ones, its body valid against the documented schema;
  - a path no documented route matches is answered 404 NOT_FOUND (401 with API_KEY), a
    documented path with a method it does not serve 405, a malformed request one of the
    connection's own answers;
  - request bodies and query parameters: the server says 400 exactly when the documented
    schema refuses them (same exceptions);
  - every documented (path, method) is answered, by something other than 404, at least once.

Patterns are ECMA-262 regular expressions, as JSON Schema says (through the `regress` package),
not Python's: `$` in Python also matches before a final newline.

Prints the counts as `# ` lines, then one `ok - ` or `not ok - ` line per verdict (VERDICTS:
the WebSocket traffic, the REST traffic, the documented routes, the API key), each failed one
followed by its mismatches; exits 1 on any mismatch. Fewer than MIN_SERVER_FRAMES server frames
or MIN_REST_RESPONSES REST responses is a mismatch too: the checker cannot pass empty.
"""

import argparse
import collections
import glob
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import jsonschema
import referencing
import referencing.jsonschema
import regress
from jsonschema.exceptions import ValidationError

MIN_SERVER_FRAMES = 1000
MIN_REST_RESPONSES = 300
SHOW_PER_KIND = 8  # mismatches shown per kind; all are counted

OPENAPI_URI = "urn:pubsub-backend:openapi"
ASYNCAPI_URI = "urn:pubsub-backend:asyncapi"

# ---- JSON Schema with ECMA-262 patterns --------------------------------------------------------

_patterns = {}


def _ecma_pattern(validator, pattern, instance, schema):
    if not validator.is_type(instance, "string"):
        return
    regex = _patterns.get(pattern)
    if regex is None:
        regex = _patterns[pattern] = regress.Regex(pattern)
    if regex.find(instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _ecma_pattern}
)


def inline_refs(document):
    """`document` with every local `$ref` ("#/...") replaced by what it points to (the documents
    have no recursive schema). Validation then follows no reference at each step, which makes
    it several times faster; what it accepts is the same."""
    done = {}

    def target(ref):
        if ref not in done:
            node = document
            for key in ref[2:].split("/"):
                key = key.replace("~1", "/").replace("~0", "~")
                node = node[int(key)] if isinstance(node, list) else node[key]
            done[ref] = None  # a reference cycle would fail here, not loop
            done[ref] = inline(node)
        if done[ref] is None:
            raise ValueError(f"recursive reference {ref}")
        return done[ref]

    def inline(node):
        if isinstance(node, list):
            return [inline(item) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            siblings = {k: inline(v) for k, v in node.items() if k != "$ref"}
            return {"allOf": [target(ref)], **siblings} if siblings else target(ref)
        return {k: inline(v) for k, v in node.items()}

    return inline(document)


class Schemas:
    """Validators for schemas inside the two documents, found through a registry that holds
    both (their local `$ref`s inlined first)."""

    def __init__(self, openapi, asyncapi):
        spec = referencing.jsonschema.DRAFT202012
        self.registry = referencing.Registry().with_resources(
            [
                (OPENAPI_URI, spec.create_resource(inline_refs(openapi))),
                (ASYNCAPI_URI, spec.create_resource(inline_refs(asyncapi))),
            ]
        )
        self._cache = {}

    def at(self, uri, pointer):
        """The validator of the schema at `pointer` (a JSON pointer) in the document `uri`."""
        key = (uri, pointer)
        if key not in self._cache:
            ref = f"{uri}#{urllib.parse.quote(pointer, safe='/~')}"
            self._cache[key] = Validator({"$ref": ref}, registry=self.registry)
        return self._cache[key]


def pointer_to(*keys):
    """A JSON pointer (RFC 6901) of `keys`."""
    return "".join("/" + str(k).replace("~", "~0").replace("/", "~1") for k in keys)


def first_error(validator, instance):
    if validator.is_valid(instance):
        return None
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message[:200]} (at /{where})"


# ---- reading JSON as the server does -----------------------------------------------------------


class DuplicateKey(Exception):
    pass


class Spelled(float):
    """A number written with a fraction or an exponent (`1.0`, `1e2`), which the server never
    reads as an integer, though JSON Schema's data model calls an integral one an integer."""


class NegativeZero(int):
    """`-0`, which the server does not read as an unsigned integer."""


def _pairs_no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise DuplicateKey(next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def _int(text):
    return NegativeZero(0) if text.lstrip("-") == "0" and text.startswith("-") else int(text)


def loads(text, duplicates_ok=True):
    """Python's json, minus what JSON is not (NaN, Infinity), with the spelling of numbers kept
    and, unless `duplicates_ok`, duplicate keys refused. Nesting too deep for Python's parser
    (the tests send up to 500,000 levels) is read by `loads_deep`."""
    try:
        value = json.loads(
            text,
            parse_constant=_no_constants,
            parse_float=Spelled,
            parse_int=_int,
            object_pairs_hook=None if duplicates_ok else _pairs_no_duplicates,
        )
    except RecursionError:  # deeper than RECURSION_LIMIT
        return loads_deep(text, duplicates_ok)
    if text.count("[") + text.count("{") > DEEP_KEPT:
        value = collapse(value)
    return value


def collapse(value):
    """`value` with what is nested deeper than DEEP_KEPT levels emptied, as `loads_deep` keeps
    it (a schema error message quotes its instance, and quoting 500,000 levels takes hours)."""
    if not isinstance(value, (dict, list)):
        return value
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in list(items):
            if isinstance(item, (dict, list)):
                if depth + 1 > DEEP_KEPT:
                    node[key] = TooDeepDict() if isinstance(item, dict) else TooDeepList()
                else:
                    stack.append((item, depth + 1))
    return value


class TooDeepList(list):
    """An array nested deeper than `loads_deep` keeps: its contents are checked, not kept."""


class TooDeepDict(dict):
    """The same for an object."""


DEEP_KEPT = 256
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_SPACE = re.compile(r"[ \t\n\r]*")


def loads_deep(text, duplicates_ok=True):
    """A JSON parser without recursion: strict like `loads`, but arrays and objects nested
    deeper than DEEP_KEPT levels come back empty, as TooDeepList or TooDeepDict (no schema here
    looks that deep; `nesting` counts them as deeper than DEEP_KEPT)."""
    scan_string = json.decoder.scanstring
    at = _SPACE.match(text, 0).end()
    stack = []  # [container, key awaited or pending, kept]
    result = None

    def fail(what):
        raise ValueError(f"{what} at char {at}")

    def read_key(at):
        """An object's key from `at` (spaces first) and its ':'; the key and where its value
        starts."""
        at = _SPACE.match(text, at).end()
        if at >= len(text) or text[at] != '"':
            raise ValueError(f"expected a key at char {at}")
        key, at = scan_string(text, at + 1, True)
        at = _SPACE.match(text, at).end()
        if at >= len(text) or text[at] != ":":
            raise ValueError(f"expected ':' at char {at}")
        return key, at + 1

    while True:
        at = _SPACE.match(text, at).end()
        if at >= len(text):
            fail("unexpected end")
        c = text[at]
        kept = not stack or stack[-1][2] and len(stack) < DEEP_KEPT
        if c == "[" or c == "{":
            container = ([] if kept else TooDeepList()) if c == "[" else ({} if kept else TooDeepDict())
            stack.append([container, None, kept])
            at += 1
            at = _SPACE.match(text, at).end()
            if at < len(text) and text[at] == ("]" if c == "[" else "}"):
                at += 1
                value = stack.pop()[0]
            elif c == "{":
                stack[-1][1], at = read_key(at)
                continue
            else:
                continue
        elif c == '"':
            value, at = scan_string(text, at + 1, True)
        elif text.startswith("true", at):
            value, at = True, at + 4
        elif text.startswith("false", at):
            value, at = False, at + 5
        elif text.startswith("null", at):
            value, at = None, at + 4
        else:
            m = _NUMBER.match(text, at)
            if not m:
                fail("unexpected character")
            value = Spelled(m.group(0)) if m.group(1) or m.group(2) else _int(m.group(0))
            at = m.end()
        # `value` is complete: put it in its container, then close what ends here.
        while True:
            if not stack:
                if _SPACE.match(text, at).end() != len(text):
                    fail("extra data")
                return value
            container, key, kept = stack[-1]
            if isinstance(container, dict):
                if key in container and not duplicates_ok:
                    raise DuplicateKey(key)
                if kept:
                    container[key] = value
            elif kept:
                container.append(value)
            at = _SPACE.match(text, at).end()
            closer = "}" if isinstance(container, dict) else "]"
            if at < len(text) and text[at] == ",":
                at += 1
                if isinstance(container, dict):
                    stack[-1][1], at = read_key(at)
                break
            if at < len(text) and text[at] == closer:
                at += 1
                value = stack.pop()[0]
                continue
            fail(f"expected ',' or '{closer}'")


def duplicate_keys(text, path):
    """Whether the object at `path` (a tuple of keys) of the JSON `text` repeats a key."""
    found = []

    def hook(pairs):
        keys = [k for k, _ in pairs]
        obj = dict(pairs)
        if len(keys) != len(set(keys)):
            obj[_DUP] = True
        return obj

    try:
        value = json.loads(text, object_pairs_hook=hook, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return False
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    found.append(isinstance(value, dict) and value.get(_DUP) is True)
    return found[0]


_DUP = object()  # marks an object with a repeated key (never a JSON key)


def walk(value, depth=1):
    """Yields (depth, value) for every value inside `value`, `value` itself at `depth`."""
    stack = [(depth, value)]
    while stack:
        d, v = stack.pop()
        yield d, v
        if isinstance(v, dict):
            for k, item in v.items():
                if isinstance(k, str):
                    yield d + 1, k
                stack.append((d + 1, item))
        elif isinstance(v, list):
            stack.extend((d + 1, item) for item in v)


def has_lone_surrogate(value):
    return any(isinstance(v, str) and re.search("[\ud800-\udfff]", v) for _, v in walk(value))


def nesting(value):
    """Levels of arrays and objects: 0 for a scalar, 1 for `[]` (beyond DEEP_KEPT for what
    `loads_deep` did not keep)."""
    return max(
        (DEEP_KEPT + 1 if isinstance(v, (TooDeepList, TooDeepDict)) else d
         for d, v in walk(value) if isinstance(v, (dict, list))),
        default=0,
    )


def has_number_beyond_double(value):
    return any(isinstance(v, float) and math.isinf(v) for _, v in walk(value))


# ---- the inexpressible: what the schemas cannot say, matched on the server's message -----------

MAX_PAYLOAD_NESTING = 124


def _payload_of(request):
    if isinstance(request, dict):
        message = request.get("message", request)
        if isinstance(message, dict) and "payload" in message:
            return message["payload"]
    return None


def _deep(request_text, request):
    payload = _payload_of(request)
    return payload is not None and nesting(payload) > MAX_PAYLOAD_NESTING


def _integer_spelling(request):
    return isinstance(request, dict) and any(
        isinstance(request.get(f), (Spelled, NegativeZero)) for f in ("last_n", "since_seq")
    )


# (name, applies(request_text, parsed request or None), server message pattern). A request the
# server refuses with BAD_REQUEST although the schema accepts it is fine only when an entry
# applies to it and its message matches; each use is counted and shown.
EXCEPTIONS = [
    (
        "a key given twice (JSON Schema sees one value per key)",
        lambda text, request: duplicate_keys(text, ()) or duplicate_keys(text, ("message",)),
        r"^duplicate key `[^`]*`: each key may appear once$|^field `message` must be an object with `id` and `payload`$",
    ),
    (
        "a lone surrogate escape in a string (not Unicode, so unreadable; JSON Schema sees a string)",
        lambda text, request: request is not None and has_lone_surrogate(request),
        r"^field `[a-z_.]+` must be a string$|is not JSON every client can read: ",
    ),
    (
        f"a payload nested deeper than {MAX_PAYLOAD_NESTING} levels",
        _deep,
        r"is not JSON every client can read: nested deeper than|recursion limit exceeded",
    ),
    (
        "a payload number beyond a double (JSON Schema has no such limit)",
        lambda text, request: request is not None and has_number_beyond_double(_payload_of(request)),
        r"is not JSON every client can read: number out of range",
    ),
    (
        "an integer written with a fraction, an exponent or a minus sign (1.0, 1e2, -0: the same number to JSON Schema)",
        lambda text, request: _integer_spelling(request),
        r"^field `(last_n|since_seq)` must be a non-negative integer$",
    ),
]


def inexpressible(text, request, message):
    for name, applies, pattern in EXCEPTIONS:
        if re.search(pattern, message or "") and applies(text, request):
            return name
    return None


# ---- bookkeeping ---------------------------------------------------------------------------------


# The verdicts, one `ok - ` or `not ok - ` line each, and what each covers.
VERDICTS = {
    "ws": "the recorded WebSocket traffic matches docs/asyncapi.json",
    "rest": "the recorded REST traffic matches docs/openapi.json",
    "routes": "every route of docs/openapi.json is answered as documented (the probe), the two documents served verbatim",
    "auth": "the API key is required exactly where docs/openapi.json says",
}


class Report:
    def __init__(self):
        self.counts = collections.Counter()
        self.mismatches = collections.defaultdict(list)  # (verdict, kind) -> details
        self.exceptions = collections.Counter()
        self.verdict = "ws"  # where the mismatches found now count

    def count(self, what, n=1):
        self.counts[what] += n

    def mismatch(self, kind, detail):
        self.mismatches[(self.verdict, kind)].append(detail)

    def failed(self, verdict=None):
        return sum(len(v) for (c, _), v in self.mismatches.items() if verdict in (None, c))


def clip(text, n=240):
    text = text if isinstance(text, str) else repr(text)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


# ---- WebSocket -----------------------------------------------------------------------------------

SERVER_SCHEMAS = {
    "ack": "/components/schemas/Ack",
    "event": "/components/schemas/Event",
    "error": "/components/schemas/Error",
    "pong": "/components/schemas/Pong",
    "info": "/components/schemas/Info",
}
UNPROMPTED_ERRORS = {"SLOW_CONSUMER", "SUBSCRIPTION_GAP"}


def read_ws(directory):
    connections = collections.OrderedDict()
    for path in sorted(glob.glob(os.path.join(directory, "ws-*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                connections.setdefault(record["conn"], []).append(record)
    return connections


def is_reply(frame):
    kind = frame.get("type")
    if kind in ("ack", "pong"):
        return True
    if kind == "error":
        return (frame.get("error") or {}).get("code") not in UNPROMPTED_ERRORS
    return False


def check_ws(connections, schemas, report):
    client_schema = schemas.at(ASYNCAPI_URI, "/components/schemas/ClientMessage")
    verdicts = {}  # request text -> (schema accepts, error)
    for conn, records in connections.items():
        requests, replies, opaque = [], [], False
        for record in records:
            if record["dir"] == "received":
                text = record["text"]
                report.count("ws server frames")
                try:
                    frame = loads(text, duplicates_ok=False)
                except (ValueError, DuplicateKey) as error:
                    report.mismatch("server frame is not JSON", f"{conn}: {error}: {clip(text)}")
                    continue
                kind = frame.get("type") if isinstance(frame, dict) else None
                if kind not in SERVER_SCHEMAS:
                    report.mismatch("server frame of no documented type", f"{conn}: {clip(text)}")
                    continue
                report.count(f"ws server frames: {kind}")
                error = first_error(schemas.at(ASYNCAPI_URI, SERVER_SCHEMAS[kind]), frame)
                if error:
                    report.mismatch(f"server `{kind}` fails its schema", f"{conn}: {error}: {clip(text)}")
                if is_reply(frame):
                    replies.append(frame)
            elif "opaque" in record:
                report.count(f"ws client frames: {record['opaque']}")
                if record["opaque"] == "raw":
                    opaque = True
                requests.append(None)  # a binary frame is refused like bad text
            else:
                report.count("ws client frames")
                requests.append(record["text"])
        pair_ws(conn, requests, replies, opaque, client_schema, verdicts, report)


def request_id_of(text):
    try:
        request = loads(text)
    except (ValueError, RecursionError):
        return None
    value = request.get("request_id") if isinstance(request, dict) else None
    return value if isinstance(value, str) and not has_lone_surrogate(value) else None


def pair_ws(conn, requests, replies, opaque, client_schema, verdicts, report):
    """Pairs requests with replies, in order; by `request_id` alone when the connection also
    carried frames the recording could not read (or the order does not hold)."""
    pairs = None
    if not opaque and len(replies) <= len(requests):
        pairs = list(zip(requests, replies))
        for text, reply in pairs:
            if text is not None and reply.get("request_id") is not None and reply.get("request_id") != request_id_of(text):
                pairs = None
                break
        if pairs is None:
            report.mismatch("replies out of order", f"{conn}: the replies do not answer the requests in order")
        elif len(replies) < len(requests):
            # The last requests of a connection: their replies were never read by the test (or
            # never sent: the connection was cut, closed or shut down first).
            report.count("ws requests whose reply was not read", len(requests) - len(replies))
    elif not opaque:
        report.mismatch("more replies than requests", f"{conn}: {len(requests)} requests, {len(replies)} replies")
    if pairs is None:
        by_id = collections.defaultdict(list)
        for reply in replies:
            if isinstance(reply.get("request_id"), str):
                by_id[reply["request_id"]].append(reply)
        asked = collections.defaultdict(list)
        for text in requests:
            rid = request_id_of(text) if text is not None else None
            if rid is not None:
                asked[rid].append(text)
        pairs = []
        for rid, texts in asked.items():
            answers = by_id.get(rid, [])
            if len(answers) <= len(texts):
                pairs.extend(zip(texts, answers))
        report.count("ws requests paired by request_id only", len(pairs))
    for text, reply in pairs:
        judge_ws_request(conn, text, reply, client_schema, verdicts, report)


def judge_ws_request(conn, text, reply, client_schema, verdicts, report):
    error = reply.get("error") or {}
    refused = reply.get("type") == "error" and error.get("code") == "BAD_REQUEST"
    message = error.get("message", "")
    report.count("ws requests checked")
    if reply.get("request_id") is not None:
        report.count("ws requests checked: with a request_id")
    if text is None:
        report.count("ws requests checked: binary")
        if not refused:
            report.mismatch("binary frame not refused", f"{conn}: answered {reply}")
        return
    if text not in verdicts:
        try:
            request = loads(text)
            problem = first_error(client_schema, request)
        except (ValueError, RecursionError) as e:
            request, problem = None, f"not JSON to Python's parser: {clip(str(e), 80)}"
        verdicts[text] = (request, problem)
    request, problem = verdicts[text]
    if refused:
        report.count("ws requests checked: refused (BAD_REQUEST)")
        if problem is not None:
            return
        name = inexpressible(text, request, message)
        if name:
            report.exceptions[f"WebSocket: {name}"] += 1
            return
        report.mismatch(
            "server refuses a request the schema accepts",
            f"{conn}: {clip(text)} -> {message}",
        )
    else:
        if problem is None:
            return
        report.mismatch(
            "schema refuses a request the server accepts",
            f"{conn}: {clip(text)} -> {reply.get('type')}: {problem}",
        )


# ---- HTTP parsing --------------------------------------------------------------------------------


class Request:
    def __init__(self, method, target, version, headers, body):
        self.method, self.target, self.version, self.headers, self.body = method, target, version, headers, body

    def header(self, name):
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)


def _line(data, at):
    end = data.find(b"\n", at)
    if end < 0:
        return None, at
    return data[at:end].rstrip(b"\r"), end + 1


def _head(data, at):
    """Start line and headers from `at`; (None, at) when incomplete or malformed."""
    start, at = _line(data, at)
    if start is None:
        return None, None, at
    headers = []
    while True:
        line, at2 = _line(data, at)
        if line is None:
            return None, None, at
        at = at2
        if not line:
            return start, headers, at
        if b":" not in line:
            return None, None, at
        name, value = line.split(b":", 1)
        headers.append((name.decode("latin-1").strip(), value.decode("latin-1").strip()))


def _chunked(data, at):
    body = b""
    while True:
        line, at = _line(data, at)
        if line is None:
            return None, at
        try:
            size = int(line.split(b";")[0].strip() or b"x", 16)
        except ValueError:
            return None, at
        if size == 0:
            while True:
                line, at = _line(data, at)
                if line is None or not line:
                    return body, at
        body += data[at:at + size]
        at += size + 2


def parse_requests(data):
    """The requests in `data`, in order; parsing stops at the first it cannot read whole
    (a malformed one is returned as None)."""
    requests, at = [], 0
    while at < len(data):
        start, headers, after = _head(data, at)
        if start is None:
            requests.append(None)
            break
        words = start.split(b" ")
        if len(words) != 3:
            requests.append(None)
            break
        method, target, version = (w.decode("latin-1") for w in words)
        request = Request(method, target, version, headers, b"")
        lengths = [v for n, v in headers if n.lower() == "content-length"]
        chunked = any(n.lower() == "transfer-encoding" for n, _ in headers)
        if chunked:
            body, after = _chunked(data, after)
            if body is None:
                requests.append(request)  # its answer is the connection's own (or none)
                break
            request.body = body
        elif lengths:
            try:
                length = int(lengths[0])
            except ValueError:
                requests.append(request)
                break
            request.body = data[after:after + length]
            after += length
        requests.append(request)
        at = after
    return requests


def parse_responses(data, requests):
    responses, at, i = [], 0, 0
    while at < len(data):
        start, headers, after = _head(data, at)
        if start is None:
            break
        words = start.split(b" ", 2)
        try:
            status = int(words[1])
        except (IndexError, ValueError):
            break
        response = Response(status, headers, b"")
        request = requests[i] if i < len(requests) else None
        no_body = status in (101, 204, 304) or (request is not None and request.method == "HEAD")
        if not no_body:
            if (response.header("transfer-encoding") or "").lower() == "chunked":
                body, after = _chunked(data, after)
                response.body = body or b""
            elif response.header("content-length") is not None:
                length = int(response.header("content-length"))
                response.body = data[after:after + length]
                after += length
            else:
                response.body = data[after:]
                after = len(data)
        responses.append(response)
        at, i = after, i + 1
        if status == 101:
            break  # WebSocket frames follow
    return responses


def _bytes(record, name):
    if name in record:
        return record[name].encode("utf-8")
    return bytes.fromhex(record.get(name + "_hex", ""))


def read_http(directory):
    for path in sorted(glob.glob(os.path.join(directory, "http-*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                request_bytes = _bytes(record, "request")
                requests = parse_requests(request_bytes)
                responses = parse_responses(_bytes(record, "response"), requests)
                yield record["source"], requests, responses


# ---- REST ----------------------------------------------------------------------------------------

CONNECTION_STATUSES = {400, 413, 414, 417, 431, 500, 503, 505}
# Messages of the 400s that the connection's checks send, before any route: not about a body.
CONNECTION_MESSAGES = re.compile(
    r"^(malformed request head|the request line and headers must be ASCII|Content-Length|"
    r"more than one Content-Length|Transfer-Encoding|a chunk|malformed chunk|chunk line|"
    r"the connection was half-closed|body shorter than|/ws expects a WebSocket upgrade)"
)
METHODS = ("get", "head", "post", "put", "delete", "options", "patch", "trace")


def origin_form(target):
    m = re.match(r"(?i)^https?://", target)
    if not m:
        return target
    rest = target[m.end():]
    cut = min([i for i in (rest.find("/"), rest.find("?")) if i >= 0], default=-1)
    return rest[cut:] if cut >= 0 and rest[cut] == "/" else "/"


class Rest:
    def __init__(self, openapi, schemas, report):
        self.doc, self.schemas, self.report = openapi, schemas, report
        self.templates = []
        for template, item in openapi["paths"].items():
            regex = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
            methods = {m.upper() for m in item if m in METHODS}
            self.templates.append((re.compile(regex), template, methods))
        self.answered = collections.defaultdict(collections.Counter)  # (template, METHOD) -> source
        self.pattern_name = re.compile(r"^/topics/([^/]+)(/messages)?$")

    def match(self, path):
        for regex, template, methods in self.templates:
            if regex.match(path):
                return template, methods
        return None, None

    def error_code(self, response):
        try:
            return json.loads(response.body)["error"]["code"], json.loads(response.body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return None, None

    def check_error_body(self, where, response, codes, request=None):
        if request is not None and request.method == "HEAD":
            if response.body:
                self.report.mismatch("a body in an answer to HEAD", where)
            return
        validator = self.schemas.at(OPENAPI_URI, "/components/schemas/Error")
        try:
            body = loads(response.body.decode("utf-8"), duplicates_ok=False)
        except (ValueError, DuplicateKey, UnicodeDecodeError) as error:
            self.report.mismatch("REST error body not JSON", f"{where}: {error}")
            return
        problem = first_error(validator, body)
        if problem:
            self.report.mismatch("REST error body fails Error", f"{where}: {problem}")
        elif body["error"]["code"] not in codes:
            self.report.mismatch("REST error code", f"{where}: {body['error']['code']}, expected one of {sorted(codes)}")

    def check(self, source, request, response):
        r = self.report
        r.count("REST responses checked")
        if request is None:
            r.count("REST responses checked: to malformed requests")
            where = f"[{source}] (malformed request) -> {response.status}"
            if response.status not in CONNECTION_STATUSES:
                r.mismatch("malformed request not refused", where)
            else:
                self.check_error_body(where, response, {"BAD_REQUEST", "PAYLOAD_TOO_LARGE", "INTERNAL"}, request)
            return
        target = origin_form(request.target)
        path, _, query = target.partition("?")
        where = f"[{source}] {request.method} {clip(request.target, 120)} -> {response.status}"
        if request.method == "OPTIONS" and target == "*":
            r.count("REST responses checked: OPTIONS *")
            if response.status != 204 or response.header("allow") != "GET, HEAD, POST, DELETE, OPTIONS":
                r.mismatch("OPTIONS *", f"{where}, Allow: {response.header('allow')}")
            return
        template, methods = self.match(path)
        if template is None:
            r.count("REST responses checked: undocumented paths")
            if response.status == 404:
                self.check_error_body(where, response, {"NOT_FOUND"}, request)
            elif response.status == 401:
                self.check_error_body(where, response, {"UNAUTHORIZED"}, request)
            elif response.status in CONNECTION_STATUSES:
                self.check_error_body(where, response, {"BAD_REQUEST", "PAYLOAD_TOO_LARGE", "INTERNAL"}, request)
            else:
                r.mismatch("an undocumented path is answered", where)
            return
        if request.method not in methods:
            r.count("REST responses checked: methods a path does not serve")
            if response.status == 405:
                self.check_error_body(where, response, {"METHOD_NOT_ALLOWED"}, request)
                allow = {m.strip() for m in (response.header("allow") or "").split(",") if m.strip()}
                if not allow or not allow <= methods:
                    r.mismatch("405 Allow header", f"{where}: Allow {sorted(allow)} not within the documented {sorted(methods)}")
            elif response.status == 401:
                self.check_error_body(where, response, {"UNAUTHORIZED"}, request)
            elif response.status in CONNECTION_STATUSES:
                self.check_error_body(where, response, {"BAD_REQUEST", "PAYLOAD_TOO_LARGE", "INTERNAL"}, request)
            else:
                r.mismatch("a method the document does not list is served", where)
            return
        operation = self.doc["paths"][template][request.method.lower()]
        if is_evidence(response):
            self.answered[(template, request.method)][source] += 1
        status = str(response.status)
        documented = operation["responses"].get(status)
        if documented is None:
            r.mismatch("undocumented status", where)
            return
        at = pointer_to("paths", template, request.method.lower(), "responses", status)
        if "$ref" in documented:
            name = documented["$ref"].rsplit("/", 1)[1]
            documented, at = self.doc["components"]["responses"][name], pointer_to("components", "responses", name)
        self.check_body(where, request, response, documented, at)
        self.check_request(where, template, request, response)

    def check_body(self, where, request, response, documented, at):
        r = self.report
        content = documented.get("content")
        if not content:
            if response.body:
                r.mismatch("a body where the document has none", f"{where}: {clip(response.body)}")
            return
        if request.method == "HEAD":
            return
        content_type = response.header("content-type")
        media = next((m for m in content if content_type and m.lower() == content_type.lower()), None)
        if media is None:
            r.mismatch("undocumented Content-Type", f"{where}: {content_type!r}, documented {sorted(content)}")
            return
        if media.startswith("application/json"):
            try:
                body = loads(response.body.decode("utf-8"), duplicates_ok=False)
            except (ValueError, DuplicateKey, UnicodeDecodeError, RecursionError) as error:
                r.mismatch("JSON body does not parse", f"{where}: {error}")
                return
        else:
            try:
                body = response.body.decode("utf-8")
            except UnicodeDecodeError:
                r.mismatch("text body not UTF-8", where)
                return
        problem = first_error(self.schemas.at(OPENAPI_URI, at + pointer_to("content", media, "schema")), body)
        if problem:
            r.mismatch("body fails its schema", f"{where}: {problem}")
        else:
            r.count("REST bodies validated")

    def check_request(self, where, template, request, response):
        """The server says 400 exactly when the documented schemas refuse the request."""
        r = self.report
        code, message = self.error_code(response) if response.status == 400 else (None, None)
        if message is not None and CONNECTION_MESSAGES.match(message):
            return
        refused = response.status == 400
        method = request.method
        if template == "/topics/{name}/messages" and method in ("GET", "HEAD"):
            problem = query_problem(request.target.partition("?")[2])
            text, parsed = request.target, None
        elif method == "POST" and template in ("/topics", "/topics/{name}/messages"):
            schema = "CreateTopicRequest" if template == "/topics" else "PublishRequest"
            try:
                text = request.body.decode("utf-8")
            except UnicodeDecodeError:
                text, parsed, problem = None, None, "body not UTF-8"
            else:
                try:
                    parsed = loads(text)
                    problem = first_error(self.schemas.at(OPENAPI_URI, f"/components/schemas/{schema}"), parsed)
                except (ValueError, RecursionError) as error:
                    parsed, problem = None, f"not JSON to Python's parser: {clip(str(error), 80)}"
        else:
            return
        r.count("REST requests checked against their schemas")
        if refused:
            if problem is not None:
                return
            name = inexpressible(text, parsed, message) if text is not None else None
            if name:
                r.exceptions[f"REST: {name}"] += 1
            else:
                r.mismatch("server refuses a request the schema accepts", f"{where}: {clip(text or '')} -> {message}")
        elif problem is not None and response.status < 500:
            if response.status in (401, 404, 413, 503) or response.status in CONNECTION_STATUSES:
                return  # refused for another reason first
            r.mismatch("schema refuses a request the server accepts", f"{where}: {clip(text or '')}: {problem}")


def is_evidence(response):
    """Whether an answer shows that its route exists: not one given before routing (401, the
    connection's refusals) nor an unknown route's 404."""
    if response.status < 400 or response.status in (409, 426, 507):
        return True
    try:
        return response.status == 404 and json.loads(response.body)["error"]["code"] == "TOPIC_NOT_FOUND"
    except (ValueError, KeyError, TypeError):
        return False


def query_problem(query):
    """What is wrong with the query of GET /topics/{name}/messages, as documented, or None."""
    seen = {}
    for pair in query.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        if key not in ("last_n", "since_seq"):
            continue
        if key in seen:
            return f"`{key}` given twice"
        seen[key] = value
        if not re.fullmatch(r"[0-9]+", value) or int(value) > 18446744073709551615:
            return f"`{key}` is not an unsigned integer in digits"
    if len(seen) == 2:
        return "both `last_n` and `since_seq`"
    return None


def check_rest(directory, rest, report):
    for source, requests, responses in read_http(directory):
        for i, response in enumerate(responses):
            request = requests[i] if i < len(requests) else None
            if i >= len(requests):
                report.count("REST responses without a parsed request")
            rest.check(source, request, response)


# ---- probing every documented route --------------------------------------------------------------


class Probe:
    """A server of our own, asked every documented route once."""

    def __init__(self, binary, env):
        self.log = open(os.devnull, "w")
        full_env = {"PATH": os.environ.get("PATH", ""), "HOST": "127.0.0.1", "PORT": "0", "LOG_LEVEL": "INFO"}
        full_env.update(env)
        self.process = subprocess.Popen([binary], env=full_env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        self.port = None
        for line in self.process.stderr:
            m = re.search(r" listening on 127\.0\.0\.1:(\d+) ", line)
            if m:
                self.port = int(m.group(1))
                break
            if time.monotonic() > deadline:
                break
        if self.port is None:
            self.stop()
            raise RuntimeError(f"{binary} did not log its address")

    def ask(self, method, target, headers=(), body=b""):
        head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
        if not any(name.lower() == "connection" for name, _ in headers):
            head += "Connection: close\r\n"
        for name, value in headers:
            head += f"{name}: {value}\r\n"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        raw = head.encode() + b"\r\n" + body
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(raw)
            received = b""
            while True:
                if received.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in received:
                    break
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
        requests = parse_requests(raw)
        return requests[0], parse_responses(received, requests)[0]

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


UPGRADE = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
           ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]


def probe_requests(openapi):
    """One request for every documented (path, method), in an order that leaves the topic in
    place for the routes that need it."""
    topic = f"probe-{uuid.uuid4().hex[:8]}"
    asks = [("POST", "/topics", (), json.dumps({"name": topic}).encode())]
    for template, item in openapi["paths"].items():
        path = template.replace("{name}", topic)
        for method in item:
            if method not in METHODS or method == "delete":
                continue
            method = method.upper()
            if method == "POST" and template == "/topics":
                continue
            body = json.dumps({"payload": {"probe": True}}).encode() if method == "POST" else b""
            asks.append((method, path, (), body))
            if template == "/ws" and method == "GET":
                asks.append((method, path, tuple(UPGRADE), b""))
    for template, item in openapi["paths"].items():
        if "delete" in item:
            asks.append(("DELETE", template.replace("{name}", topic), (), b""))
    return asks


def probe(binary, openapi, docs_dir, rest, report):
    """Every documented route asked once, on a server without and one with API_KEY: the answers
    checked like the recorded ones; the key required exactly where the document says; the two
    documents served verbatim."""
    asks = probe_requests(openapi)
    report.verdict = "routes"
    served = collections.Counter()
    server = Probe(binary, {})
    try:
        for method, path, headers, body in asks:
            request, response = server.ask(method, path, headers, body)
            rest.check("probe", request, response)
            report.count("REST probe requests")
            for name in ("openapi.json", "asyncapi.json"):
                if method == "GET" and path == f"/{name}" and response.status == 200:
                    served[name] += 1
                    with open(os.path.join(docs_dir, name), "rb") as f:
                        if response.body != f.read():
                            report.mismatch("document not served verbatim", f"GET /{name}")
        for name in ("openapi.json", "asyncapi.json"):
            if not served[name]:
                report.mismatch("document not served", f"GET /{name} is not answered 200")
    finally:
        server.stop()
    key = f"probe-{uuid.uuid4()}"
    server = Probe(binary, {"API_KEY": key})
    try:
        for method, path, headers, body in asks:
            template, _ = rest.match(path)
            operation = openapi["paths"][template][method.lower()]
            secured = operation.get("security", openapi.get("security")) != []
            request, response = server.ask(method, path, headers, body)
            rest.check("probe (API_KEY, no key)", request, response)
            report.verdict = "auth"
            if secured != (response.status == 401):
                report.mismatch(
                    "API key required where the document does not say so" if not secured else
                    "API key not required where the document says so",
                    f"{method} {path} without the key -> {response.status}",
                )
            request, response = server.ask(method, path, headers + (("X-API-Key", key),), body)
            if response.status == 401:
                report.mismatch("the key refused", f"{method} {path} with the key -> 401")
            report.verdict = "routes"
            rest.check("probe (API_KEY)", request, response)
            report.count("REST probe requests", 2)
    finally:
        server.stop()


# ---- main ------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="the recorded traffic (PUBSUB_API_RECORD)")
    parser.add_argument("--server", help="the server binary, to probe every documented route")
    parser.add_argument("--docs", default=os.path.join(os.path.dirname(__file__), "..", "..", "docs"))
    args = parser.parse_args()

    with open(os.path.join(args.docs, "openapi.json"), encoding="utf-8") as f:
        openapi = json.load(f)
    with open(os.path.join(args.docs, "asyncapi.json"), encoding="utf-8") as f:
        asyncapi = json.load(f)
    schemas = Schemas(openapi, asyncapi)
    report = Report()
    started = time.monotonic()

    report.verdict = "ws"
    check_ws(read_ws(args.directory), schemas, report)
    rest = Rest(openapi, schemas, report)
    report.verdict = "rest"
    check_rest(args.directory, rest, report)
    from_tests = {key for key, sources in rest.answered.items() if sources}
    if args.server:
        probe(args.server, openapi, args.docs, rest, report)

    documented = [(t, m.upper()) for t, item in openapi["paths"].items() for m in item if m in METHODS]
    report.verdict = "routes"
    for key in documented:
        if not rest.answered.get(key):
            report.mismatch("a documented route is never answered", f"{key[1]} {key[0]}")
    by_tests = [k for k in documented if k in from_tests]
    only_probe = [f"{m} {t}" for t, m in documented if (t, m) not in from_tests and rest.answered.get((t, m))]

    print(f"# checked in {time.monotonic() - started:.1f}s:")
    for what, n in sorted(report.counts.items()):
        print(f"#   {what}: {n}")
    print(f"#   documented routes answered by the Rust tests: {len(by_tests)} of {len(documented)}")
    if only_probe:
        print(f"#   answered only to the probe: {', '.join(only_probe)}")
    for name, n in sorted(report.exceptions.items()):
        print(f"#   inexpressible in JSON Schema, matched on the server's message: {name}: {n}")

    frames = report.counts["ws server frames"]
    responses = report.counts["REST responses checked"]
    if frames < MIN_SERVER_FRAMES:
        report.verdict = "ws"
        report.mismatch("too little traffic", f"{frames} server frames, fewer than {MIN_SERVER_FRAMES}")
    if responses < MIN_REST_RESPONSES:
        report.verdict = "rest"
        report.mismatch("too little traffic", f"{responses} REST responses, fewer than {MIN_REST_RESPONSES}")
    totals = {
        "ws": f"{frames} server frames, {report.counts['ws requests checked']} requests with their replies",
        "rest": f"{responses} responses, {report.counts['REST requests checked against their schemas']} requests against their schemas",
        "routes": f"{len(documented)} routes, {report.counts['REST probe requests']} requests" if args.server else "",
        "auth": "",
    }
    for verdict, name in VERDICTS.items():
        if verdict == "auth" and not args.server:
            continue  # asked of a server of our own only
        if verdict == "routes" and not args.server:
            name += " (by the recorded traffic alone: no --server)"
        if report.failed(verdict):
            print(f"not ok - {name}: {report.failed(verdict)} mismatch(es)")
        else:
            print(f"ok - {name}" + (f" ({totals[verdict]})" if totals[verdict] else ""))
        for (v, kind), details in sorted(report.mismatches.items()):
            if v != verdict:
                continue
            print(f"#   {kind}: {len(details)}")
            for detail in details[:SHOW_PER_KIND]:
                print(f"#     {clip(detail, 400)}")
    return 1 if report.failed() else 0


# Python's parser recurses once per level of nesting, and the tests send up to 500,000: main runs
# in a thread with a stack big enough for RECURSION_LIMIT levels (about 400 bytes each), and
# `loads_deep` reads anything deeper.
RECURSION_LIMIT = 1_500_000
STACK_BYTES = 1024 * 1024 * 1024


def run_with_deep_stack(function):
    outcome = []
    sys.setrecursionlimit(RECURSION_LIMIT)
    threading.stack_size(STACK_BYTES)
    thread = threading.Thread(target=lambda: outcome.append(function()))
    thread.start()
    thread.join()
    return outcome[0] if outcome else 1


if __name__ == "__main__":
    sys.exit(run_with_deep_stack(main))
