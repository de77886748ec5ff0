#!/usr/bin/env node
// Lists every line longer than the formatter's width (120 characters, biome.json's lineWidth) in the files Biome
// checks: src/, test/ and scripts/ and the files at the repository's root, with the extensions .ts, .mjs, .js,
// .json and .sql (not node_modules, dist or package-lock.json). Biome does not wrap comments, strings or template
// literals, so this check catches what the formatter leaves long. Prints "file:line: length" for each such line
// and exits 1 if there is any, 0 otherwise. Markdown files are not checked.
// Usage: node scripts/check-width.mjs (from the repository's root)

import { readdirSync, readFileSync } from "node:fs";
import { join, relative } from "node:path";

const WIDTH = 120;
const EXTENSIONS = [".ts", ".mjs", ".js", ".json", ".sql"];
const SKIPPED = new Set(["node_modules", "dist", "package-lock.json"]);
const root = process.cwd();

/** The files under `dir` (recursively when `deep`) that the check reads, as absolute paths. */
function filesIn(dir, deep) {
  const found = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    if (SKIPPED.has(entry.name) || entry.name.startsWith(".")) continue;
    const path = join(dir, entry.name);
    if (entry.isDirectory()) {
      if (deep) found.push(...filesIn(path, true));
    } else if (entry.isFile() && EXTENSIONS.some((ext) => entry.name.endsWith(ext))) {
      found.push(path);
    }
  }
  return found;
}

const files = [
  ...filesIn(root, false),
  ...["src", "test", "scripts"].flatMap((dir) => filesIn(join(root, dir), true)),
].sort();

let long = 0;
for (const file of files) {
  const lines = readFileSync(file, "utf8").split("\n");
  lines.forEach((line, index) => {
    const length = [...line.replace(/\r$/, "")].length;
    if (length > WIDTH) {
      long += 1;
      console.log(`${relative(root, file)}:${index + 1}: ${length}`);
    }
  });
}

if (long > 0) {
  console.log(`${long} line(s) longer than ${WIDTH} characters`);
  process.exit(1);
}
