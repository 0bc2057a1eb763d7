// Validates an AsyncAPI document with @asyncapi/parser (pinned by package.json here), as
// AsyncAPI tooling would read it: the specification's JSON Schema, then the parser's own rules
// (references, channels and operations, the schemas of every message).
//
//   node tests/api/validate-asyncapi.mjs docs/asyncapi.json
//
// Prints one `# ` line per diagnostic and exits non-zero on any error or warning; `ok` lines
// are test.sh's business.
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const SEVERITY = ["error", "warning", "info", "hint"];

const file = process.argv[2];
if (!file) {
  console.error("usage: node validate-asyncapi.mjs FILE");
  process.exit(2);
}
const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(file, "utf8"), { source: file });
let problems = 0;
for (const d of diagnostics) {
  const severity = SEVERITY[d.severity] ?? String(d.severity);
  // error and warning fail the check; info and hint are only shown.
  if (d.severity <= 1) problems++;
  console.log(`# ${severity}: ${d.code}: ${d.message} at /${d.path.join("/")}`);
}
if (!document) {
  console.log(`# ${file}: the parser gave no document`);
  process.exit(1);
}
const count = (collection) => collection.all().length;
console.log(
  `# ${file}: AsyncAPI ${document.version()}, ${count(document.channels())} channel(s), ` +
    `${count(document.operations())} operation(s), ${count(document.messages())} message(s), ` +
    `${problems} error(s) or warning(s)`,
);
process.exit(problems === 0 ? 0 : 1);
