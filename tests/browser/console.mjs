// The live console in a real browser: Debian's headless Chromium, driven by playwright-core.
//
//   node tests/browser/console.mjs http://127.0.0.1:PORT [API_KEY]
//
// Starts nothing but the browser: the caller (test.sh) starts the server, on a fresh state and
// with API_KEY set, and passes its URL and key. The test
//   1. opens GET /, types the key into #api-key,
//   2. creates the topic through the page and waits for its row in the topics table,
//   3. publishes one message over REST, then subscribes through the page with last_n=1 and
//      sees it replayed with its seq,
//   4. publishes JSON through the page and sees the event with its seq and ts, the same seq
//      and id that GET /topics/{name}/messages reports,
//   5. in a second page, opens the browser's own `new WebSocket(url + "/ws?api_key=KEY")`,
//      subscribes and publishes, and gets its event back (the console shows it too); without
//      the key the browser's WebSocket is refused,
//   6. saves a 1280x800 screenshot of the console with the events to console.png (README.md
//      shows it; SCREENSHOT overrides the path).
// Every check prints `ok - NAME` or `not ok - NAME: DETAIL` (TAP-like, counted by test.sh);
// the first failure ends the run with exit code 1 and, where ARTIFACTS_DIR is set, a
// screenshot of the moment there. Settings: CHROMIUM (default /usr/bin/chromium), TOPIC
// (default orders), TIMEOUT_MS for each wait (default 10000).

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const [baseArg, apiKey = ""] = process.argv.slice(2);
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const topic = process.env.TOPIC || "orders";
const timeout = Number(process.env.TIMEOUT_MS || 10000);
const screenshotPath = process.env.SCREENSHOT || join(here, "console.png");
const artifactsDir = process.env.ARTIFACTS_DIR || "";

if (!baseArg || !/^https?:\/\//.test(baseArg)) {
  console.error("usage: node console.mjs http://HOST:PORT [API_KEY]");
  process.exit(2);
}
const base = baseArg.replace(/\/+$/, "");
const wsBase = base.replace(/^http/, "ws");

/** Thrown by a failed check; carries the check's name. */
class CheckFailed extends Error {
  constructor(name, detail) {
    super(detail);
    this.check = name;
  }
}

let passed = 0;
/** Runs one named check: `ok - NAME`, or throws CheckFailed with what went wrong. */
async function check(name, body) {
  try {
    await body();
  } catch (error) {
    throw new CheckFailed(name, String((error && error.message) || error).split("\n")[0]);
  }
  passed += 1;
  console.log(`ok - browser: ${name}`);
}

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

/** A REST call from Node to the same server, with the key. */
async function rest(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey) headers["X-API-Key"] = apiKey;
  const response = await fetch(base + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(timeout),
  });
  const text = await response.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: response.status, json, text };
}

/** The events list item whose meta line is `TOPIC  seq N  TS  id ID`. */
function eventItem(page, seq) {
  const meta = new RegExp(`^${topic}  seq ${seq}  \\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d\\.\\d{3}Z  id [0-9a-f-]{36}$`);
  return page.locator("#events li").filter({ has: page.locator(".meta", { hasText: meta }) });
}

/** Waits for the event with `seq` and returns its meta line and payload text. */
async function shownEvent(page, seq) {
  const item = eventItem(page, seq);
  await item.waitFor({ state: "visible", timeout });
  const meta = (await item.locator(".meta").textContent()).trim();
  const payload = JSON.parse(await item.locator("pre").textContent());
  return { meta, payload, id: meta.split(" id ")[1] };
}

function sameJson(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

/**
 * Runs in the second page: the browser's native WebSocket subscribes to `topic`, publishes
 * `payload` once subscribed, and resolves with every message up to its own event and the
 * publish's ack.
 */
function nativeRoundTrip({ url, topic, payload, timeout }) {
  return new Promise((resolve, reject) => {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    const id = `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
    const received = [];
    const ws = new WebSocket(url);
    const timer = setTimeout(() => {
      ws.close();
      reject(new Error(`no event of its own within ${timeout} ms; got ${JSON.stringify(received)}`));
    }, timeout);
    ws.onclose = (e) => {
      clearTimeout(timer);
      reject(new Error(`closed (${e.code}) after ${JSON.stringify(received)}`));
    };
    ws.onopen = () => ws.send(JSON.stringify({ type: "subscribe", topic, client_id: "native-page", request_id: "s1" }));
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      received.push(m);
      if (m.type === "ack" && m.request_id === "s1") {
        ws.send(JSON.stringify({ type: "publish", topic, request_id: "p1", message: { id, payload } }));
      }
      // Its own event and the publish ack may come in either order.
      const done = received.some((r) => r.type === "event") && received.some((r) => r.request_id === "p1");
      if (done) {
        clearTimeout(timer);
        ws.onclose = null;
        ws.close();
        resolve({ id, received });
      }
    };
  });
}

/** Runs in the second page: how a WebSocket to `url` ends, "open" or "closed CODE". */
function nativeOutcome({ url, timeout }) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url);
    const timer = setTimeout(() => resolve("no outcome"), timeout);
    ws.onopen = () => {
      clearTimeout(timer);
      ws.close();
      resolve("open");
    };
    ws.onclose = (e) => {
      clearTimeout(timer);
      resolve(`closed ${e.code}`);
    };
  });
}

async function run(context, pageErrors) {
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (error) => pageErrors.push(error.message));

  await check("GET / opens the console", async () => {
    const response = await page.goto(base + "/", { timeout });
    assert(response && response.status() === 200, `status ${response && response.status()}`);
    const title = await page.title();
    assert(title.includes("console"), `title is ${JSON.stringify(title)}`);
  });

  await check("the API key typed into #api-key is used", async () => {
    await page.fill("#api-key", apiKey);
    await page.press("#api-key", "Tab"); // commits the value: the page's change handler
    const stored = await page.evaluate(() => localStorage.getItem("pubsub-api-key"));
    assert(stored === apiKey, `the page kept ${JSON.stringify(stored)}`);
  });

  await check(`creating topic ${topic} in the page lists it`, async () => {
    await page.fill("#topic-name", topic);
    await page.click("#create-topic");
    await page.locator(`#topics tr[data-topic="${topic}"]`).waitFor({ state: "visible", timeout });
    const listed = await rest("GET", "/topics");
    assert(listed.status === 200, `GET /topics answered ${listed.status}`);
    assert(listed.json.topics.some((t) => t.name === topic), `the server lists ${listed.text}`);
  });

  const restPayload = { from: "rest", item: "book", qty: 1 };
  await check("subscribing in the page with last_n=1 replays the last event with its seq", async () => {
    const published = await rest("POST", `/topics/${topic}/messages`, { payload: restPayload });
    assert(published.status === 201 && published.json.seq === 1, `publish answered ${published.status} ${published.text}`);
    await page.fill("#sub-topic", topic);
    await page.fill("#sub-last-n", "1");
    await page.click("#subscribe");
    const shown = await shownEvent(page, 1);
    assert(sameJson(shown.payload, restPayload), `payload shown: ${JSON.stringify(shown.payload)}`);
    assert(shown.id === published.json.id, `id shown ${shown.id}, published ${published.json.id}`);
    const status = await page.textContent("#ws-status");
    assert(/open/.test(status), `#ws-status says ${JSON.stringify(status)}`);
  });

  const consolePayload = { from: "console", item: "lamp", qty: 2 };
  await check("publishing JSON in the page shows the event with seq 2 and its ts", async () => {
    await page.fill("#pub-topic", topic);
    await page.fill("#pub-payload", JSON.stringify(consolePayload));
    await page.click("#publish");
    const shown = await shownEvent(page, 2);
    assert(sameJson(shown.payload, consolePayload), `payload shown: ${JSON.stringify(shown.payload)}`);
    const history = await rest("GET", `/topics/${topic}/messages?since_seq=1`);
    assert(history.status === 200, `history answered ${history.status}`);
    const [stored] = history.json.messages;
    assert(
      history.json.messages.length === 1 && stored.seq === 2 && stored.id === shown.id && sameJson(stored.payload, consolePayload),
      `the server stored ${history.text}, the page showed ${shown.meta}`,
    );
  });

  await check("the topics table counts 1 subscriber and 2 messages", async () => {
    const counts = (name) => {
      const row = document.querySelector(`#topics tr[data-topic="${name}"]`);
      return row ? Array.from(row.querySelectorAll("td.num"), (td) => td.textContent.trim()).join(",") : "no row";
    };
    // The page refreshes the table after every event and every 3 s.
    await page.waitForFunction(`(${counts})(${JSON.stringify(topic)}) === "1,2"`, null, { timeout }).catch(() => {});
    const seen = await page.evaluate(counts, topic);
    assert(seen === "1,2", `subscribers,messages shown: ${seen}`);
  });

  const second = await context.newPage();
  second.on("pageerror", (error) => pageErrors.push(error.message));
  // A page of the server's own origin that runs no console code: /health.
  await second.goto(base + "/health", { timeout });

  const nativePayload = { from: "native-websocket", item: "pen", qty: 3 };
  await check("a second page's native WebSocket with ?api_key= subscribes, publishes and gets its event", async () => {
    const url = `${wsBase}/ws?api_key=${encodeURIComponent(apiKey)}`;
    const { id, received } = await second.evaluate(nativeRoundTrip, { url, topic, payload: nativePayload, timeout });
    const types = received.map((m) => `${m.type}${m.request_id ? ":" + m.request_id : ""}`).sort().join(" ");
    assert(types === "ack:p1 ack:s1 event", `messages: ${types}`);
    const publishAck = received.find((m) => m.request_id === "p1");
    const event = received.find((m) => m.type === "event");
    assert(publishAck.status === "ok" && publishAck.seq === 3, `publish ack ${JSON.stringify(publishAck)}`);
    assert(
      event.seq === 3 && event.topic === topic && event.message.id === id && sameJson(event.message.payload, nativePayload),
      `event ${JSON.stringify(event)}`,
    );
  });

  await check("the console shows the native WebSocket's event too (seq 3)", async () => {
    const shown = await shownEvent(page, 3);
    assert(sameJson(shown.payload, nativePayload), `payload shown: ${JSON.stringify(shown.payload)}`);
  });

  if (apiKey) {
    await check("a native WebSocket without the key is refused", async () => {
      const outcome = await second.evaluate(nativeOutcome, { url: `${wsBase}/ws`, timeout });
      assert(outcome.startsWith("closed"), `outcome: ${outcome}`);
    });
  }
  await second.close();

  await check(`screenshot of the console saved (${screenshotPath})`, async () => {
    await page.bringToFront();
    await page.screenshot({ path: screenshotPath });
  });

  await check("no script error in either page", async () => {
    assert(pageErrors.length === 0, pageErrors.join(" | "));
  });
}

async function main() {
  let chromium;
  try {
    ({ chromium } = await import("playwright-core"));
  } catch (error) {
    console.log(`not ok - browser: playwright-core: ${error.message.split("\n")[0]} (npm install --prefix tests/browser)`);
    return 1;
  }
  const profile = mkdtempSync(join(tmpdir(), "pubsub-chromium-"));
  let context;
  const pageErrors = [];
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: chromiumPath,
      headless: true,
      viewport: { width: 1280, height: 800 },
      timeout,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
      ],
    });
  } catch (error) {
    console.log(`not ok - browser: Chromium starts (${chromiumPath}): ${error.message.split("\n")[0]}`);
    rmSync(profile, { recursive: true, force: true });
    return 1;
  }
  try {
    await run(context, pageErrors);
    return 0;
  } catch (error) {
    const name = error instanceof CheckFailed ? error.check : "unexpected error";
    console.log(`not ok - browser: ${name}: ${error.message}`);
    if (artifactsDir) {
      for (const [n, page] of context.pages().entries()) {
        const path = join(artifactsDir, `browser-failure-${n}.png`);
        await page.screenshot({ path }).then(() => console.log(`# screenshot of the failure: ${path}`), () => {});
      }
    }
    return 1;
  } finally {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
    console.log(`# ${passed} browser checks passed`);
  }
}

process.exit(await main());
