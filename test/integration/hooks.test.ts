import { chmod, mkdir, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createWorkload, type Workload } from "../../src/load/workload.js";
import { loadMigration } from "../../src/migration/state.js";
import { catalogSnapshot } from "../support/catalog.js";
import { describeRun, expectRefusal, runCli, waitUntil } from "../support/cli.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Item 6 of issue 16: `--hooks-dir` runs the executables named after events, through the real CLI (a child process)
 * and its real hooks (shell scripts that record their environment): the PGSHIFT_* variables they get, a failing
 * on-before-cutover that stops the cutover before anything changes (exit 2, one line), on-failure on a failure,
 * a non-executable or unknown hook refused at startup, a hook that overruns its timeout killed without failing the
 * command.
 */

let db: TestDatabase;
let tmp: string;
beforeAll(async () => {
  db = await freshDatabase();
  tmp = await mkdtemp(join(tmpdir(), "pgshift-hooks-"));
});
afterAll(async () => {
  await db?.close();
  await rm(tmp, { recursive: true, force: true });
});

const pgshift = (args: string[]) => runCli([...args, "--url", db.url]);

/** A fresh hooks directory and the directory its hooks record to. */
async function hooksDir(name: string): Promise<{ dir: string; out: string }> {
  const dir = join(tmp, name);
  const out = join(tmp, `${name}-out`);
  await mkdir(dir);
  await mkdir(out);
  return { dir, out };
}

/**
 * Writes hook `hook` in `dir`: it records its PGSHIFT_* variables to `<out>/<hook>.env` (sorted, one per line),
 * then runs `then` (shell), and exits with its status. `mode` defaults to executable.
 */
async function writeHook(dir: string, out: string, hook: string, then = "exit 0", mode = 0o755): Promise<void> {
  const path = join(dir, hook);
  await writeFile(path, `#!/bin/sh\nenv | grep '^PGSHIFT_' | sort > '${join(out, `${hook}.env`)}'\n${then}\n`);
  await chmod(path, mode);
}

/** The variables a hook recorded, or null when it did not run. */
async function recorded(out: string, hook: string): Promise<Record<string, string> | null> {
  const text = await readFile(join(out, `${hook}.env`), "utf8").catch(() => null);
  if (text === null) return null;
  return Object.fromEntries(
    text
      .split("\n")
      .filter((l) => l.includes("="))
      .map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]),
  );
}

const MONTH = ["--partition-by", "range:created_at:month", "--allow-key-extension"];

describe("hooks through a migration", () => {
  const w: Workload = {
    table: { schema: "public", name: "hk" },
    twin: { schema: "twin", name: "hk" },
    keyKind: "bigint",
  };
  let h: { dir: string; out: string };
  beforeAll(async () => {
    await createWorkload(db.admin, w, 700);
    h = await hooksDir("flow");
    for (const hook of ["on-start", "on-copy-complete", "on-verify-done", "on-cutover", "on-failure"])
      await writeHook(h.dir, h.out, hook);
    // Not a hook: ignored.
    await writeFile(join(h.dir, "README"), "hooks of the test\n");
  });

  it("on-start and on-copy-complete get the table, the command, the phase and the counts", async () => {
    const r = await pgshift(["start", "hk", ...MONTH, "--hooks-dir", h.dir]);
    expect(r.code, describeRun(r)).toBe(0);
    const s = await recorded(h.out, "on-start");
    expect(s).toMatchObject({
      PGSHIFT_HOOK: "on-start",
      PGSHIFT_TABLE: "public.hk",
      PGSHIFT_COMMAND: "start",
      PGSHIFT_PHASE: "started",
      PGSHIFT_HOOKS_DIR: h.dir,
    });
    expect(Number(s?.PGSHIFT_ELAPSED_SECONDS)).toBeGreaterThanOrEqual(0);
    expect(s?.PGSHIFT_ERROR).toBeUndefined();
    // The hook's run is logged (JSON lines on stderr when not on a terminal).
    expect(r.stderr).toContain('"msg":"hook on-start ran"');

    const b = await pgshift(["backfill", "hk", "--batch-size", "200", "--batch-time-ms", "0", "--hooks-dir", h.dir]);
    expect(b.code, describeRun(b)).toBe(0);
    expect(await recorded(h.out, "on-copy-complete")).toMatchObject({
      PGSHIFT_HOOK: "on-copy-complete",
      PGSHIFT_TABLE: "public.hk",
      PGSHIFT_COMMAND: "backfill",
      PGSHIFT_ROWS_COPIED: "700",
      PGSHIFT_BATCHES: "4",
    });
    expect(await recorded(h.out, "on-failure")).toBeNull();

    const v = await pgshift(["verify", "hk", "--hooks-dir", h.dir]);
    expect(v.code, describeRun(v)).toBe(0);
    expect(await recorded(h.out, "on-verify-done")).toMatchObject({
      PGSHIFT_COMMAND: "verify",
      PGSHIFT_VERIFY_EQUAL: "true",
    });
  }, 60_000);

  it("a failing on-before-cutover stops the cutover before any change: exit 2, one line; on-failure runs", async () => {
    await writeHook(h.dir, h.out, "on-before-cutover", "echo 'replicas not ready' >&2; exit 3");
    const before = await catalogSnapshot(db.admin);
    const r = await pgshift(["cutover", "hk", "--hooks-dir", h.dir]);
    expectRefusal(r, "the on-before-cutover hook failed: exit code 3: replicas not ready");
    expect(r.stderr).toMatch(/^pgshift: error: the on-before-cutover hook failed: exit code 3: replicas not ready$/m);
    expect(await catalogSnapshot(db.admin)).toEqual(before);
    expect((await loadMigration(db.sql, w.table))?.phase).toBe("backfilled");
    expect(await recorded(h.out, "on-before-cutover")).toMatchObject({
      PGSHIFT_HOOK: "on-before-cutover",
      PGSHIFT_COMMAND: "cutover",
      PGSHIFT_TABLE: "public.hk",
    });
    expect(await recorded(h.out, "on-cutover")).toBeNull();
    expect(await recorded(h.out, "on-failure")).toMatchObject({
      PGSHIFT_HOOK: "on-failure",
      PGSHIFT_COMMAND: "cutover",
      PGSHIFT_ERROR: "the on-before-cutover hook failed: exit code 3: replicas not ready",
    });
  }, 30_000);

  it("a passing on-before-cutover lets it run; on-cutover gets the phase, the blocked time", async () => {
    await rm(join(h.out, "on-failure.env"));
    await writeHook(h.dir, h.out, "on-before-cutover", "exit 0");
    const r = await pgshift(["cutover", "hk", "--hooks-dir", h.dir]);
    expect(r.code, describeRun(r)).toBe(0);
    expect((await loadMigration(db.sql, w.table))?.phase).toBe("cutover");
    const before = await stat(join(h.out, "on-before-cutover.env"));
    const after = await stat(join(h.out, "on-cutover.env"));
    expect(before.mtimeMs).toBeLessThanOrEqual(after.mtimeMs);
    const c = await recorded(h.out, "on-cutover");
    expect(c).toMatchObject({ PGSHIFT_HOOK: "on-cutover", PGSHIFT_COMMAND: "cutover", PGSHIFT_PHASE: "cutover" });
    expect(Number(c?.PGSHIFT_WRITES_BLOCKED_MS)).toBeGreaterThan(0);
    expect(await recorded(h.out, "on-failure")).toBeNull();
  }, 30_000);

  it("on-failure runs on a refused command, with the error", async () => {
    const r = await pgshift(["abort", "hk", "--hooks-dir", h.dir]);
    expect(r.code, describeRun(r)).toBe(2);
    const f = await recorded(h.out, "on-failure");
    expect(f).toMatchObject({ PGSHIFT_COMMAND: "abort", PGSHIFT_TABLE: "public.hk" });
    const line = r.stderr.split("\n").find((l) => l.startsWith("pgshift: error: "));
    expect(`pgshift: error: ${f?.PGSHIFT_ERROR}`).toBe(line);
  }, 30_000);

  it("a hook past its timeout is killed and logged; the command succeeds", async () => {
    await writeHook(h.dir, h.out, "on-swap-back", `sleep 20 & echo $! > '${join(h.out, "sleep.pid")}'; wait`);
    const r = await pgshift(["swap-back", "hk", "--hooks-dir", h.dir, "--hooks-timeout-ms", "300"]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.ms).toBeLessThan(15_000);
    expect((await loadMigration(db.sql, w.table))?.phase).toBe("swapped_back");
    expect(r.stderr).toContain('"msg":"hook on-swap-back failed"');
    expect(r.stderr).toContain("timed out after 300 ms");
    // What the hook started was killed with it.
    const pid = Number(await readFile(join(h.out, "sleep.pid"), "utf8"));
    expect(pid).toBeGreaterThan(0);
    // Gone, or a zombie nobody reaps (a container's init may not): not running in any case.
    const running = async () => {
      const st = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => null);
      return st !== null && !/^\d+ \(.*\) Z/.test(st);
    };
    await waitUntil("the hook's sleep is killed", async () => !(await running()), 5000);
  }, 30_000);
});

describe("hooks refused at startup", () => {
  const w: Workload = {
    table: { schema: "public", name: "hk2" },
    twin: { schema: "twin", name: "hk2" },
    keyKind: "bigint",
  };
  beforeAll(async () => {
    await createWorkload(db.admin, w, 50);
  });

  it("a hook that is not executable: exit 2, one line, nothing changed", async () => {
    const h = await hooksDir("noexec");
    await writeHook(h.dir, h.out, "on-start", "exit 0", 0o644);
    const before = await catalogSnapshot(db.admin);
    const r = await pgshift(["start", "hk2", ...MONTH, "--hooks-dir", h.dir]);
    expectRefusal(r, `hook ${join(h.dir, "on-start")} is not an executable file`);
    expect(await catalogSnapshot(db.admin)).toEqual(before);
    expect(await recorded(h.out, "on-start")).toBeNull();
  }, 30_000);

  it("a misspelt hook, and a missing directory: exit 2, one line, nothing changed", async () => {
    const h = await hooksDir("typo");
    await writeHook(h.dir, h.out, "on-before-cutovr");
    const before = await catalogSnapshot(db.admin);
    const r = await pgshift(["start", "hk2", ...MONTH, "--hooks-dir", h.dir]);
    expectRefusal(r, "on-before-cutovr is not a pgshift hook");
    const m = await pgshift(["start", "hk2", ...MONTH, "--hooks-dir", join(tmp, "nowhere")]);
    expectRefusal(m, "--hooks-dir", "cannot be read: ENOENT");
    expect(await catalogSnapshot(db.admin)).toEqual(before);
  }, 30_000);

  it("no hook for the event: skipped", async () => {
    const h = await hooksDir("empty");
    const r = await pgshift(["start", "hk2", ...MONTH, "--hooks-dir", h.dir]);
    expect(r.code, describeRun(r)).toBe(0);
    expect((await loadMigration(db.sql, w.table))?.phase).toBe("started");
  }, 30_000);
});
