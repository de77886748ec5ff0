#!/usr/bin/env node
// npm run build's second step: copies src/sql to dist/sql (the .sql files the library reads at run time), leaving out
// the .ts files tsc has already compiled. Usage: node scripts/copy-sql.mjs (from the repository's root)

import { cpSync } from "node:fs";

cpSync("src/sql", "dist/sql", { recursive: true, filter: (f) => !f.endsWith(".ts") });
