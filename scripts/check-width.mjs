#!/usr/bin/env node
// Lists every line longer than the formatter's width (120 characters, biome.json's lineWidth) in the files Biome
// checks: src/, test/ and scripts/ and the files at the repository's root, with the extensions .ts, .mjs, .js,
// .json and .sql (not node_modules, dist or package-lock.json). Biome does not wrap comments, strings or template
// literals, so this check catches what the formatter leaves long. Prints "file:line: length" for each such line
// and exits 1 if there is any, 0 otherwise. Markdown files are not checked.
// Usage: node scripts/check-width.mjs (from the repository's root; it asks git for the list of files)

import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";

const WIDTH = 120;
const EXTENSIONS = [".ts", ".mjs", ".js", ".json", ".sql"];

// The files git knows or would add (tracked, and untracked but not ignored: Biome also follows .gitignore), in
// src/, test/, scripts/ or at the root.
const listed = execFileSync("git", ["ls-files", "--cached", "--others", "--exclude-standard", "-z"], {
  encoding: "utf8",
}).split("\0");
const files = [...new Set(listed)]
  .filter((path) => /^(src|test|scripts)\//.test(path) || (path !== "" && !path.includes("/")))
  .filter((path) => EXTENSIONS.some((ext) => path.endsWith(ext)) && path !== "package-lock.json")
  .filter((path) => !path.split("/").some((part) => part === "node_modules" || part === "dist"))
  .filter((path) => existsSync(path)) // a tracked file deleted in the work tree is not checked
  .sort();

let long = 0;
for (const file of files) {
  const lines = readFileSync(file, "utf8").split("\n");
  lines.forEach((line, index) => {
    const length = [...line.replace(/\r$/, "")].length;
    if (length > WIDTH) {
      long += 1;
      console.log(`${file}:${index + 1}: ${length}`);
    }
  });
}

if (long > 0) {
  console.log(`${long} line(s) longer than ${WIDTH} characters`);
  process.exit(1);
}
