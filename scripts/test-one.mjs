#!/usr/bin/env node
// npm run test:one: one vitest run on one PostgreSQL major (PGSHIFT_TEST_PG, default 17), its JSON report written to
// test-results.json, then the summary of that report (scripts/test-summary.mjs). Exits with vitest's status.
// Arguments go to vitest: npm run test:one -- test/integration/errors.test.ts

import { spawnSync } from "node:child_process";

const run = spawnSync(
  "npx",
  [
    "vitest",
    "run",
    "--reporter=default",
    "--reporter=json",
    "--outputFile=test-results.json",
    ...process.argv.slice(2),
  ],
  { stdio: "inherit" },
);
spawnSync(process.execPath, ["scripts/test-summary.mjs", "test-results.json"], { stdio: "inherit" });
process.exit(run.status ?? 1);
