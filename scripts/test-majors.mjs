// `npm test`: the whole suite on the default PostgreSQL major, then the tests whose behaviour differs between
// majors (concurrency in both modes with every spec, logical mode and its races through repeated cutovers, one
// plan in both modes, schema) on each other supported major.
//
//   PGSHIFT_TEST_PG=16 npm test          whole suite on 16, then the subset on 14, 15, 17, 18
//   PGSHIFT_TEST_MAJORS=14,18 npm test   the subset on 14 and 18 only (empty: the default major alone)
//   npm test -- test/unit                arguments go to vitest; then only the default major runs, unless
//                                        PGSHIFT_TEST_MAJORS names others (they run the same arguments)
//
// Each run writes vitest's JSON report to test-results-<major>.json; they are added up into test-results.json
// and scripts/test-summary.mjs prints the closing line "N passed, N failed, N skipped" from it.
// With DATABASE_URL set every test file uses that server, so there is one run, on it.
import { spawnSync } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";

const MAJORS = [14, 15, 16, 17, 18];
const DEFAULT = 17; // keep in step with DEFAULT_EMBEDDED_MAJOR in src/embedded.ts
const SUBSET = [
  "test/integration/app-schema.test.ts",
  "test/integration/concurrency.test.ts",
  "test/integration/logical.test.ts",
  "test/integration/lock-holders.test.ts",
  "test/integration/logical-race.test.ts",
  "test/integration/one-plan.test.ts",
  "test/integration/schema.test.ts",
];

const main = Number(process.env.PGSHIFT_TEST_PG || DEFAULT);
if (!MAJORS.includes(main)) {
  console.error(`PGSHIFT_TEST_PG must be one of ${MAJORS.join(", ")}`);
  process.exit(2);
}
const extra = process.argv.slice(2);
const others =
  process.env.PGSHIFT_TEST_MAJORS !== undefined
    ? process.env.PGSHIFT_TEST_MAJORS.split(",")
        .map((s) => s.trim())
        .filter(Boolean)
        .map(Number)
    : extra.length
      ? []
      : MAJORS.filter((m) => m !== main);
for (const m of others) {
  if (!MAJORS.includes(m)) {
    console.error(`PGSHIFT_TEST_MAJORS: ${m} is not one of ${MAJORS.join(", ")}`);
    process.exit(2);
  }
}
const runs = [{ major: main, files: [] }];
if (process.env.DATABASE_URL) {
  console.log(
    `DATABASE_URL is set: one run, on that server (PGSHIFT_TEST_PG=${main} for the servers tests start themselves)`,
  );
} else {
  for (const m of others) if (m !== main) runs.push({ major: m, files: extra.length ? [] : SUBSET });
}

const reports = [];
let failed = false;
for (const run of runs) {
  const out = `test-results-${run.major}.json`;
  rmSync(out, { force: true });
  const what = run.files.length
    ? run.files.map((f) => f.replace(/^test\/integration\/|\.test\.ts$/g, "")).join(", ")
    : extra.length
      ? extra.join(" ")
      : "whole suite";
  console.log(`\n===== PostgreSQL ${run.major}: ${what}\n`);
  const t0 = Date.now();
  const r = spawnSync(
    "npx",
    ["vitest", "run", "--reporter=default", "--reporter=json", `--outputFile=${out}`, ...run.files, ...extra],
    {
      stdio: "inherit",
      env: { ...process.env, PGSHIFT_TEST_PG: String(run.major) },
    },
  );
  const s = Math.round((Date.now() - t0) / 1000);
  if (r.status !== 0) failed = true;
  let report;
  try {
    report = JSON.parse(readFileSync(out, "utf8"));
  } catch {
    report = { numPassedTests: 0, numFailedTests: 1, numPendingTests: 0, numTodoTests: 0, testResults: [] };
    failed = true;
  }
  reports.push({ major: run.major, seconds: s, status: r.status, report });
}

console.log("\n===== per major");
for (const { major, seconds, status, report } of reports) {
  console.log(
    `PostgreSQL ${major}: ${report.numPassedTests} passed, ${report.numFailedTests} ` +
      `failed, ${(report.numPendingTests ?? 0) + (report.numTodoTests ?? 0)} skipped in ${seconds} ` +
      `s${status !== 0 ? ` (vitest exit ${status})` : ""}`,
  );
}
for (const { major, report } of reports) {
  // Name every failed test here, next to the counts, so that the end of the output says which one failed.
  for (const file of report.testResults ?? []) {
    for (const t of file.assertionResults ?? []) {
      if (t.status !== "failed") continue;
      const lines = String(t.failureMessages?.[0] ?? "").split("\n");
      const why = lines[0].slice(0, 300);
      // The project's own frames (src/, test/; not node_modules), so that the record says where it was thrown.
      const where = lines
        .filter((l) => /^\s*at /.test(l) && /\/(src|test)\//.test(l) && !l.includes("node_modules"))
        .slice(0, 6)
        .map((l) => `    ${l.trim().replace(/\(.*?\/((src|test)\/)/, "($1")}`);
      console.log(`FAILED on ${major}: ${file.name.replace(/^.*?(test\/)/, "$1")} > ${t.fullName}\n  ${why}`);
      for (const l of where) console.log(l);
    }
  }
}
console.log(`all runs: ${reports.reduce((n, r) => n + r.seconds, 0)} s`);
const sum = (k) => reports.reduce((n, { report }) => n + (report[k] ?? 0), 0);
const merged = {
  numPassedTests: sum("numPassedTests"),
  numFailedTests: sum("numFailedTests") + (failed && sum("numFailedTests") === 0 ? 1 : 0),
  numPendingTests: sum("numPendingTests"),
  numTodoTests: sum("numTodoTests"),
  numTotalTests: sum("numTotalTests"),
  success: !failed,
  majors: reports.map(({ major, seconds, report }) => ({
    major,
    seconds,
    passed: report.numPassedTests,
    failed: report.numFailedTests,
  })),
  testResults: reports.flatMap(({ major, report }) => (report.testResults ?? []).map((t) => ({ ...t, major }))),
};
writeFileSync("test-results.json", JSON.stringify(merged));
const summary = spawnSync(process.execPath, ["scripts/test-summary.mjs", "test-results.json"], { stdio: "inherit" });
process.exit(failed || summary.status !== 0 ? 1 : 0);
