import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover } from "../../src/cutover/cutover.js";
import { connect, type Sql, table as tableRef, transaction } from "../../src/db.js";
import { type EmbeddedServer, startEmbedded } from "../../src/embedded.js";
import { createWorkload, type Workload } from "../../src/load/workload.js";
import { abort, finalize } from "../../src/migration/finish.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration, logicalNames } from "../../src/migration/state.js";
import { dropStream, lsnToBigInt } from "../../src/mirror/logical.js";
import { quoteQualified } from "../../src/names.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { columnList } from "../../src/sql/statement.js";
import type { StatusReport } from "../../src/status.js";
import { verify } from "../../src/verify/verify.js";
import { catalogSnapshot } from "../support/catalog.js";
import { type CliResult, describeRun, exitWithin, type Running, runCli, spawnCli, waitUntil } from "../support/cli.js";
import { createLoginRole, freshDatabase, sleep, type TestDatabase } from "../support/db.js";

/**
 * The logical mirror (--mode logical) through the real CLI and against real servers: prerequisites
 * refused before anything is created, no slot or publication left behind by a failed start, a crashed
 * start, abort or finalize, a `pgshift sync` killed in the middle of a large transaction losing and
 * half-applying nothing, and status showing the stream.
 */

let db: TestDatabase;

const MONTH = ["--partition-by", "range:created_at:month"];

/** Runs pgshift against the test database (or `url`). */
const pgshift = (args: string[], url = db.url) => runCli([...args, "--url", url]);

/**
 * Opens a transaction on a connection of its own that holds ROW EXCLUSIVE on `table` (as one that wrote to
 * it would) until `release()`, which also closes the connection (idempotent). Resolves once the lock is held.
 */
async function holdRowExclusive(table: string): Promise<{ release: () => Promise<void> }> {
  let release!: () => void;
  const released = new Promise<void>((r) => (release = r));
  let lockedNow!: () => void;
  const locked = new Promise<void>((r) => (lockedNow = r));
  const holder = await connect({ url: db.url });
  const holding = holder.begin(async (tx) => {
    await tx`lock table ${tx(table)} in row exclusive mode`;
    lockedNow();
    await released;
  });
  await Promise.race([locked, holding]);
  let done: Promise<void> | null = null;
  return {
    release: () =>
      (done ??= (async () => {
        release();
        await holding.catch(() => {});
        await holder.end();
      })()),
  };
}

/** stderr without empty lines. */
const stderrLines = (r: CliResult) => r.stderr.split("\n").filter((l) => l.trim() !== "");

/** Exit 2, exactly one `pgshift: error:` line (optionally one `pgshift: hint:` line) containing every pattern. */
function expectRefusal(r: CliResult, ...patterns: string[]): string {
  expect(r.signal, describeRun(r)).toBeNull();
  expect(r.code, describeRun(r)).toBe(2);
  const lines = stderrLines(r);
  expect(
    lines.filter((l) => l.startsWith("pgshift: error:")),
    describeRun(r),
  ).toHaveLength(1);
  expect(lines[0], describeRun(r)).toMatch(/^pgshift: error: /);
  expect(lines.length, describeRun(r)).toBeLessThanOrEqual(2);
  if (lines.length === 2) expect(lines[1], describeRun(r)).toMatch(/^pgshift: hint: \S/);
  for (const p of patterns) expect(lines[0], describeRun(r)).toContain(p);
  return lines[0]!;
}

/** `plan` with blockers: exit 2, the plan on stdout with `blocker:` lines, one of them containing every pattern. */
function expectPlanBlocker(r: CliResult, ...patterns: string[]): void {
  expect(r.signal, describeRun(r)).toBeNull();
  expect(r.code, describeRun(r)).toBe(2);
  const blockers = r.stdout.split("\n").filter((l) => l.startsWith("  blocker: "));
  expect(blockers.length, describeRun(r)).toBeGreaterThan(0);
  expect(
    blockers.some((b) => patterns.every((p) => b.includes(p))),
    describeRun(r),
  ).toBe(true);
  expect(r.stdout, describeRun(r)).not.toContain("statements start runs");
  expect(r.stdout, describeRun(r)).not.toContain("CREATE PUBLICATION");
}

/** A small table with a bigserial key and a NOT NULL time column. */
async function createOrders(sql: Sql, name: string, rows = 200): Promise<void> {
  await sql.unsafe(
    `
    create table ${name} (
      id bigserial primary key,
      created_at timestamptz not null,
      note text
    );
    insert into ${name} (created_at, note)
      select timestamptz '2025-01-01 00:00+00' + i * interval '11 hours', 'order ' || i from ` +
      `generate_series(1, ${rows}) i;
    analyze ${name};`,
  );
}

/** Creates an orders table `name` with `rows` rows and starts its migration by month in logical mode. */
async function startLogical(
  name: string,
  rows: number,
): Promise<{ table: { schema: string; name: string }; names: ReturnType<typeof logicalNames> }> {
  await createOrders(db.admin, name, rows);
  const table = { schema: "public", name };
  const names = logicalNames(await oidOf(db.admin, name));
  await startMigration(db.sql, table, {
    allowKeyExtension: true,
    spec: parsePartitionSpec("range:created_at:month"),
    mode: "logical",
  });
  return { table, names };
}

async function oidOf(sql: Sql, name: string): Promise<number> {
  const r = await sql`select to_regclass(${name})::oid::int as oid`;
  return Number(r[0]!.oid);
}

/**
 * What a logical-mode start creates, as it stands: slots and publications of this database, the shadow, migration rows.
 */
async function streamObjects(
  sql: Sql,
  table: string,
): Promise<{ slots: string[]; publications: string[]; shadow: boolean; migrations: number }> {
  const r = await sql`
    select coalesce((select array_agg(slot_name::text order by slot_name) from pg_replication_slots where database =
      current_database()), '{}') as slots,
           coalesce((select array_agg(pubname::text order by pubname) from pg_publication), '{}') as publications,
           to_regclass(${`public.${table}_pgshift_shadow`}) is not null as shadow,
           to_regclass('pgshift.migrations') is not null as has_migrations`;
  const x = r[0]!;
  let migrations = 0;
  if (x.has_migrations) {
    const n = await sql`select count(*)::int as n from pgshift.migrations where source_table = ${table}`;
    migrations = Number(n[0]!.n);
  }
  return {
    slots: x.slots as string[],
    publications: x.publications as string[],
    shadow: Boolean(x.shadow),
    migrations,
  };
}

interface SlotRow {
  exists: boolean;
  active: boolean;
  confirmed: string | null;
}

async function slotRow(sql: Sql, slot: string): Promise<SlotRow> {
  const r = await sql`select active, confirmed_flush_lsn::text as confirmed from pg_replication_slots where slot_name =
      ${slot}`;
  if (r.length === 0) return { exists: false, active: false, confirmed: null };
  return { exists: true, active: Boolean(r[0]!.active), confirmed: (r[0]!.confirmed as string | null) ?? null };
}

/** Starts `pgshift sync <table>` and waits until it is attached to the slot. */
/** Every sync started here: one left running by a failed test would try to connect for ever. */
const syncs: Running[] = [];

async function startSync(table: string, slot: string): Promise<Running> {
  const s = spawnCli(["sync", table, "--url", db.url]);
  syncs.push(s);
  let done = false;
  void s.exited.then(() => (done = true));
  await waitUntil(`pgshift sync ${table} attaches to slot ${slot}`, async () => {
    if (done) throw new Error(`pgshift sync exited early:\n${s.out.stdout}\n${s.out.stderr}`);
    return (await slotRow(db.admin, slot)).active;
  });
  return s;
}

/** SIGINT: sync must stop cleanly, exit 0 and say so. */
async function interruptSync(s: Running): Promise<void> {
  s.child.kill("SIGINT");
  const ex = await s.exited;
  const text = `exit ${String(ex.code)} ${String(ex.signal)}\n--- stdout\n${s.out.stdout}--- stderr\n${s.out.stderr}`;
  expect(ex.signal, text).toBeNull();
  expect(ex.code, text).toBe(0);
  expect(s.out.stdout, text).toContain("sync stopped");
}

/** Two-way EXCEPT between the source and its shadow over the copied columns: rows only in one of them. */
async function compareWithShadow(
  sql: Sql,
  table: string,
): Promise<{ onlyInSource: number; onlyInShadow: number; rows: number }> {
  const m = (await loadMigration(sql, { schema: "public", name: table }))!;
  const cols = columnList(m.copy_columns);
  const a = quoteQualified(m.original);
  const b = quoteQualified(m.partitioned);
  const r = await sql.unsafe(`
    select (select count(*) from (select ${cols} from ${a} except select ${cols} from ${b}) x)::int as a,
           (select count(*) from (select ${cols} from ${b} except select ${cols} from ${a}) y)::int as b,
           (select count(*) from ${a})::int as n`);
  return { onlyInSource: Number(r[0]!.a), onlyInShadow: Number(r[0]!.b), rows: Number(r[0]!.n) };
}

beforeAll(async () => {
  db = await freshDatabase();
});

afterAll(async () => {
  for (const s of syncs) if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill("SIGKILL");
  if (!db) return;
  // DROP DATABASE refuses while a logical slot of the database exists: drop what a failed test left.
  await db.admin`select pg_drop_replication_slot(slot_name) from pg_replication_slots where database =
    current_database() and not active`.catch(() => {});
  await db.close();
});

describe("prerequisites: start --mode logical refuses, naming the problem, and leaves nothing behind", () => {
  /** A second database on the run's server, for the checks that need nothing of pgshift to exist yet. */
  let pre: TestDatabase;
  let replica: EmbeddedServer | null = null;
  let oneSlot: EmbeddedServer | null = null;
  let replicaSql: Sql | null = null;
  let oneSlotSql: Sql | null = null;
  let role: Awaited<ReturnType<typeof createLoginRole>> | null = null;
  let roleUrl = "";

  beforeAll(async () => {
    pre = await freshDatabase();
    replica = await startEmbedded({ walLevel: "replica" });
    oneSlot = await startEmbedded({ maxReplicationSlots: 1 });
    replicaSql = await connect({ url: replica.url, max: 2 });
    oneSlotSql = await connect({ url: oneSlot.url, max: 2 });
    await createOrders(replicaSql, "orders");
    await createOrders(oneSlotSql, "orders");
    await oneSlotSql`select pg_create_logical_replication_slot('other', 'pgoutput')`;

    await createOrders(pre.admin, "good");
    await createOrders(pre.admin, "norepl");
    await createOrders(pre.admin, "ri_nothing");
    await pre.admin.unsafe(`alter table ri_nothing replica identity nothing`);
    role = await createLoginRole(pre, "pgshift_norepl");
    await pre.admin.unsafe(`alter table norepl owner to ${role.name}`);
    roleUrl = role.url;
  }, 120_000);

  afterAll(async () => {
    await replicaSql?.end({ timeout: 5 }).catch(() => {});
    await oneSlotSql?.end({ timeout: 5 }).catch(() => {});
    await replica?.stop();
    await oneSlot?.stop();
    await pre?.close();
    await role?.drop();
  });

  /**
   * Runs start and plan (both --mode logical) on `table` through `url`; start must be refused with one
   * error line containing `patterns`, plan must list the same problem as a blocker; afterwards no slot,
   * no publication, no shadow, no migration row, and the catalog snapshot (taken through `check`) is unchanged.
   */
  async function refused(
    check: () => Sql,
    url: string,
    table: string,
    patterns: string[],
    slotsAfter: string[] = [],
  ): Promise<void> {
    const sql = check();
    const before = await catalogSnapshot(sql);
    const [start, plan] = await Promise.all([
      runCli(["start", "--allow-key-extension", table, ...MONTH, "--mode", "logical", "--url", url]),
      runCli(["plan", table, ...MONTH, "--mode", "logical", "--url", url]),
    ]);
    expectRefusal(start, `public.${table} cannot be migrated`, ...patterns);
    expectPlanBlocker(plan, ...patterns);
    expect(await streamObjects(sql, table)).toEqual({
      slots: slotsAfter,
      publications: [],
      shadow: false,
      migrations: 0,
    });
    expect(await catalogSnapshot(sql)).toEqual(before);
  }

  it("wal_level = replica", async () => {
    await refused(() => replicaSql!, replica!.url, "orders", ["wal_level is replica", "needs wal_level = logical"]);
  });

  it("no free replication slot (max_replication_slots = 1, one slot taken)", async () => {
    await refused(
      () => oneSlotSql!,
      oneSlot!.url,
      "orders",
      ["no free replication slot", "max_replication_slots = 1"],
      ["other"],
    );
  });

  it("a table owner without the REPLICATION privilege", async () => {
    await refused(() => pre.admin, roleUrl, "norepl", ["lacks the REPLICATION privilege"]);
  });

  it("REPLICA IDENTITY NOTHING", async () => {
    await refused(() => pre.admin, pre.url, "ri_nothing", ["public.ri_nothing has REPLICA IDENTITY NOTHING"]);
  });

  it("plan --mode logical on a good table prints the publication and the slot, and changes nothing", async () => {
    const before = await catalogSnapshot(pre.admin);
    const r = await runCli(["plan", "good", ...MONTH, "--mode", "logical", "--url", pre.url]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout, describeRun(r)).not.toContain("blocker:");
    const oid = await oidOf(pre.admin, "good");
    expect(r.stdout).toContain(`CREATE PUBLICATION "pgshift_${oid}" FOR TABLE`);
    expect(r.stdout).toContain(`pg_create_logical_replication_slot('pgshift_${oid}', 'pgoutput')`);
    expect(await catalogSnapshot(pre.admin)).toEqual(before);
  });
});

describe("start, stream and clean-up in logical mode", () => {
  it(
    "a start that fails after creating the slot (lock timeout on the source) drops the slot and the publication " +
      "again",
    async () => {
      await createOrders(db.admin, "locked");
      const oid = await oidOf(db.admin, "locked");
      const names = logicalNames(oid);
      const before = await catalogSnapshot(db.admin);
      // An open transaction that holds ROW EXCLUSIVE on the table (as one that wrote to it would, but without
      // an xid, so that the slot can be created): CREATE PUBLICATION (SHARE UPDATE EXCLUSIVE) gets through,
      // the TRUNCATE guard's CREATE TRIGGER (SHARE ROW EXCLUSIVE) in the start transaction does not.
      const lock = await holdRowExclusive("locked");
      try {
        const run = runCli([
          "start",
          "--allow-key-extension",
          "locked",
          ...MONTH,
          "--mode",
          "logical",
          "--lock-timeout",
          "2000",
          "--retries",
          "0",
          "--url",
          db.url,
        ]);
        // The slot and publication exist while start waits for the lock: the failure comes after them.
        let seen = false;
        // Watched until start ends (a fixed number of polls ran out before the slot existed on a loaded machine).
        let ended = false;
        void run.then(
          () => (ended = true),
          () => (ended = true),
        );
        const watching = (async () => {
          while (!ended && !seen) {
            const o = await streamObjects(db.admin, "locked");
            if (o.slots.includes(names.slot) && o.publications.includes(names.publication)) seen = true;
            else await sleep(25);
          }
        })();
        const r = await run;
        await watching;
        expect(seen, "the slot and the publication existed while start waited for the lock").toBe(true);
        // Not expectRefusal: besides the error and the hint, stderr holds the warning logged for the failed attempt.
        expect(r.code, describeRun(r)).toBe(2);
        const errors = stderrLines(r).filter((l) => l.startsWith("pgshift: error:"));
        expect(errors, describeRun(r)).toHaveLength(1);
        // Refused by the lock timeout, or (when creating the slot took longer than the lock timeout, so the holder
        // had held the table that long already) before the lock was requested, naming the holder (issue 16).
        expect(errors[0], describeRun(r)).toMatch(
          /could not lock the tables (within 2000 ms after 1 attempts|after 1 attempts: a session holds the lock: pid)/,
        );
      } finally {
        await lock.release();
      }
      expect(await streamObjects(db.admin, "locked")).toEqual({
        slots: [],
        publications: [],
        shadow: false,
        migrations: 0,
      });
      expect(await catalogSnapshot(db.admin)).toEqual(before);
    },
  );

  it(
    "a transaction left open (with an xid) blocks the slot: start gives up after --slot-timeout-ms naming its pid, " +
      "leaves nothing; once it ends, start goes through",
    async () => {
      await createOrders(db.admin, "idlexact");
      await db.admin`create table elsewhere (x int)`;
      const before = await catalogSnapshot(db.admin);
      let release!: () => void;
      const released = new Promise<void>((r) => (release = r));
      let wrote!: (pid: number) => void;
      const written = new Promise<number>((r) => (wrote = r));
      const holder = await connect({ url: db.url });
      // An application session idle in a transaction that wrote elsewhere: it holds a transaction id.
      const holding = holder.begin(async (tx) => {
        await tx`insert into elsewhere values (1)`;
        wrote(Number((await tx`select pg_backend_pid() as pid`)[0]!.pid));
        await released;
      });
      try {
        const pid = await Promise.race([written, holding.then(() => -1)]);
        const r = await runCli([
          "start",
          "--allow-key-extension",
          "idlexact",
          ...MONTH,
          "--mode",
          "logical",
          "--slot-timeout-ms",
          "1500",
          "--url",
          db.url,
        ]);
        expect(r.code, describeRun(r)).toBe(2);
        const errors = stderrLines(r).filter((l) => l.startsWith("pgshift: error:"));
        expect(errors, describeRun(r)).toHaveLength(1);
        expect(errors[0], describeRun(r)).toContain("the replication slot was not created within 1500 ms");
        expect(errors[0], describeRun(r)).toContain(`pid ${pid} (idle in transaction since `);
        expect(
          stderrLines(r).some((l) => l.startsWith("pgshift: hint:") && l.includes("pg_terminate_backend")),
          describeRun(r),
        ).toBe(true);
        expect(await streamObjects(db.admin, "idlexact")).toEqual({
          slots: [],
          publications: [],
          shadow: false,
          migrations: 0,
        });
        expect(await catalogSnapshot(db.admin)).toEqual(before);

        // The same start, with the transaction ending while it waits: the slot is created and start succeeds.
        const run = runCli([
          "start",
          "--allow-key-extension",
          "idlexact",
          ...MONTH,
          "--mode",
          "logical",
          "--url",
          db.url,
        ]);
        await sleep(1000);
        release();
        await holding;
        const ok = await run;
        expect(ok.code, describeRun(ok)).toBe(0);
        const names = logicalNames(await oidOf(db.admin, "idlexact"));
        expect(await streamObjects(db.admin, "idlexact")).toEqual({
          slots: [names.slot],
          publications: [names.publication],
          shadow: true,
          migrations: 1,
        });
        expect((await runCli(["abort", "idlexact", "--url", db.url])).code).toBe(0);
      } finally {
        release();
        await holding.catch(() => {});
        await holder.end();
      }
    },
  );

  it(
    "pgshift sync killed (SIGKILL) while applying a large transaction: nothing partial, nothing confirmed, a " +
      "restart catches up",
    async () => {
      const name = "bigtx";
      const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
      await createWorkload(db.admin, w, 6_000);
      await startMigration(db.sql, w.table, {
        allowKeyExtension: true,
        spec: parsePartitionSpec("range:created_at:month"),
        mode: "logical",
      });
      const bf = await backfill(db.sql, w.table, { batchSize: 3000 });
      expect(bf.complete).toBe(true);
      const m = (await loadMigration(db.admin, w.table))!;
      const slot = m.slot_name!;
      const shadow = `public.${m.shadow_table}`;
      expect(await compareWithShadow(db.admin, name)).toMatchObject({ onlyInSource: 0, onlyInShadow: 0, rows: 6_000 });
      // pg_walinspect (PostgreSQL 15+) finds the large transaction's commit record; 14 has none: see below.
      const walinspect =
        Number((await db.admin`select current_setting('server_version_num')::int as v`)[0]!.v) >= 150000;
      if (walinspect) await db.admin`create extension if not exists pg_walinspect`;

      const sync1 = await startSync(name, slot);
      // ONE large transaction: 6k inserts, 6k updates (12 of them leave a TOASTed note unchanged), 1.5k deletes
      // (applying it takes the applier several seconds on 2 cores: the kill lands well inside it).
      const big = await transaction(db.sql, async (tx) => {
        await tx`set local synchronous_commit = on`;
        const xid = String((await tx`select pg_current_xact_id()::xid::text as x`)[0]!.x);
        await tx.unsafe(
          `
        insert into bigtx (created_at, region, status, amount, note, data)
        select now() - (i % 600) * interval '1 day', 'apac', 'bignew', i % 1000, 'big ' || i, ` +
            `jsonb_build_object('big', i)
          from generate_series(1, 6000) i`,
        );
        const upd = await tx.unsafe(
          `update bigtx set status = 'big', amount = coalesce(amount, 0) + 1 where id <= 6000`,
        );
        const del = await tx.unsafe(`delete from bigtx where id <= 1500`);
        expect(upd.count).toBe(6_000);
        expect(del.count).toBe(1_500);
        const pre = String((await tx`select pg_current_wal_insert_lsn()::text as l`)[0]!.l);
        return { xid, pre };
      });
      let commit: { start: string; end: string } | undefined;
      if (walinspect) {
        const commitRec = await db.admin`
        select start_lsn::text as start, end_lsn::text as "end"
          from pg_get_wal_records_info(${big.pre}::pg_lsn, pg_current_wal_flush_lsn())
         where resource_manager = 'Transaction' and record_type = 'COMMIT' and xid = ${big.xid}::xid`;
        expect(commitRec, "the large transaction's commit record").toHaveLength(1);
        commit = { start: String(commitRec[0]!.start), end: String(commitRec[0]!.end) };
      }

      // Kill sync once its apply transaction has written into the shadow (it has an xid), i.e. mid-transaction.
      const applying = async () =>
        (
          await db.admin`select count(*)::int as n from pg_stat_activity
                       where datname = current_database() and application_name = ${`pgshift apply ${name}`} and
                         backend_xid is not null`
        )[0]!.n > 0;
      await waitUntil("sync applies the large transaction", applying, 60_000, 10);
      sync1.child.kill("SIGKILL");
      expect((await sync1.exited).signal).toBe("SIGKILL");
      await waitUntil(
        "the killed sync's slot consumer and apply session are gone",
        async () => {
          const s = await slotRow(db.admin, slot);
          const apply =
            await db.admin`select count(*)::int as n from pg_stat_activity where datname = current_database() and
            application_name = ${`pgshift apply ${name}`}`;
          return !s.active && apply[0]!.n === 0;
        },
        20_000,
      );

      // The slot did not confirm the large transaction, and the shadow holds none of it or all of it.
      const killed = await slotRow(db.admin, slot);
      expect(killed.exists).toBe(true);
      if (!commit) {
        // PostgreSQL 14: the slot (inactive now) decodes the stream again without moving; pgoutput's Commit message
        // carries the commit record's start and end LSN (protocol message "Commit": 'C', flags, commit LSN, end LSN).
        const c = await db.admin`
        select encode(substring(data from 3 for 8), 'hex') as s, encode(substring(data from 11 for 8), 'hex') as e
          from pg_logical_slot_peek_binary_changes(${slot}, null, null, 'proto_version', '1', 'publication_names',
            ${m.publication_name!})
         where xid = ${big.xid}::xid and get_byte(data, 0) = 67`;
        expect(c, "the large transaction's commit message").toHaveLength(1);
        const lsn = (hex: string) =>
          `${BigInt(`0x${hex.slice(0, 8)}`)
            .toString(16)
            .toUpperCase()}/${BigInt(`0x${hex.slice(8)}`)
            .toString(16)
            .toUpperCase()}`;
        commit = { start: lsn(String(c[0]!.s)), end: lsn(String(c[0]!.e)) };
      }
      const flushed = String((await db.admin`select pg_current_wal_flush_lsn()::text as l`)[0]!.l);
      expect(
        lsnToBigInt(commit.start),
        `commit record ${commit.start}..${commit.end} after ${big.pre}`,
      ).toBeGreaterThanOrEqual(lsnToBigInt(big.pre));
      expect(lsnToBigInt(commit.end)).toBeGreaterThan(lsnToBigInt(commit.start));
      expect(lsnToBigInt(commit.end)).toBeLessThanOrEqual(lsnToBigInt(flushed));
      const counts = async () => {
        const r = await db.admin.unsafe(
          `
        select count(*) filter (where status = 'big')::int as updated, count(*) filter (where status = ` +
            `'bignew')::int as inserted,
               count(*) filter (where id <= 1500)::int as undeleted
          from ${shadow}`,
        );
        return { updated: Number(r[0]!.updated), inserted: Number(r[0]!.inserted), undeleted: Number(r[0]!.undeleted) };
      };
      const none = { updated: 0, inserted: 0, undeleted: 1_500 };
      const all = { updated: 4_500, inserted: 6_000, undeleted: 0 };
      const afterKill = await counts();
      expect([none, all]).toContainEqual(afterKill);
      // Killed mid-apply: nothing of it committed in the shadow, the slot's confirmed LSN is at most where the
      // commit record starts (the slot will send the transaction again), and the recorded applied LSN too.
      expect(afterKill).toEqual(none);
      expect(
        lsnToBigInt(killed.confirmed!),
        `confirmed ${killed.confirmed} vs commit record ${commit.start}..${commit.end}`,
      ).toBeLessThanOrEqual(lsnToBigInt(commit.start));
      const mk = (await loadMigration(db.admin, w.table))!;
      if (mk.applied_lsn) expect(lsnToBigInt(mk.applied_lsn)).toBeLessThanOrEqual(lsnToBigInt(commit.start));

      // A new sync applies it from the slot, whole.
      const target = String((await db.admin`select pg_current_wal_insert_lsn()::text as l`)[0]!.l);
      const sync2 = await startSync(name, slot);
      try {
        await waitUntil(
          `the slot confirms ${target}`,
          async () => {
            const s = await slotRow(db.admin, slot);
            return s.confirmed !== null && lsnToBigInt(s.confirmed) >= lsnToBigInt(target);
          },
          60_000,
          100,
        );
      } finally {
        await interruptSync(sync2);
      }
      expect(await counts()).toEqual(all);
      expect(await compareWithShadow(db.admin, name)).toEqual({ onlyInSource: 0, onlyInShadow: 0, rows: 10_500 });
      const v = await verify(db.sql, w.table);
      expect(v.differences).toEqual([]);
      expect(v.equal).toBe(true);
      await pgshift(["abort", name]);
      expect(await streamObjects(db.admin, name)).toEqual({
        slots: [],
        publications: [],
        shadow: false,
        migrations: 0,
      });
    },
  );

  it(
    "status shows the stream (slot, retained WAL, confirmed LSN, lag), active while sync runs; TRUNCATE is refused; " +
      "abort drops slot and publication",
    async () => {
      await createOrders(db.admin, "st", 300);
      const oid = await oidOf(db.admin, "st");
      const names = logicalNames(oid);
      const start = await pgshift(["start", "--allow-key-extension", "st", ...MONTH, "--mode", "logical"]);
      expect(start.code, describeRun(start)).toBe(0);
      expect(start.stdout).toContain("logical mirror installed");
      expect(await streamObjects(db.admin, "st")).toEqual({
        slots: [names.slot],
        publications: [names.publication],
        shadow: true,
        migrations: 1,
      });

      const statusJson = async (): Promise<StatusReport> => {
        const r = await pgshift(["status", "st", "--json"]);
        expect(r.code, describeRun(r)).toBe(0);
        return JSON.parse(r.stdout) as StatusReport;
      };
      const [idle, human] = await Promise.all([statusJson(), pgshift(["status", "st"])]);
      expect(idle.mode).toBe("logical");
      expect(idle.stream).not.toBeNull();
      const st = idle.stream!;
      expect(st).toMatchObject({ slot: names.slot, exists: true, active: false, activePid: null });
      expect(st.retainedBytes).toBeGreaterThanOrEqual(0);
      expect(st.confirmedLsn).toMatch(/^[0-9A-F]+\/[0-9A-F]+$/);
      expect(st.lagBytes).toBeGreaterThanOrEqual(0);
      expect(typeof st.lagBytes).toBe("number");
      expect(st.warnings.some((x) => x.includes("no consumer is attached"))).toBe(true);
      expect(human.code, describeRun(human)).toBe(0);
      expect(human.stdout).toMatch(new RegExp(`replication slot\\s*│?\\s*${names.slot} idle: no consumer attached`));

      // TRUNCATE of the source is refused in logical mode too (object_in_use).
      await expect(db.admin.unsafe("truncate st")).rejects.toMatchObject({ code: "55006" });
      expect((await db.admin`select count(*)::int as n from st`)[0]!.n).toBe(300);

      const sync = await startSync("st", names.slot);
      try {
        const [busy, h] = await Promise.all([statusJson(), pgshift(["status", "st"])]);
        expect(busy.stream).toMatchObject({ slot: names.slot, exists: true, active: true });
        expect(busy.stream!.activePid).toEqual(expect.any(Number));
        expect(busy.mirror.ok).toBe(true);
        expect(h.stdout, describeRun(h)).toMatch(
          new RegExp(`replication slot\\s*│?\\s*${names.slot} streaming to pid \\d+`),
        );
      } finally {
        await interruptSync(sync);
      }
      await waitUntil("the slot is released", async () => !(await slotRow(db.admin, names.slot)).active, 10_000);

      await backfill(db.sql, { schema: "public", name: "st" }, { batchSize: 100 });
      const ab = await pgshift(["abort", "st"]);
      expect(ab.code, describeRun(ab)).toBe(0);
      expect(await streamObjects(db.admin, "st")).toEqual({
        slots: [],
        publications: [],
        shadow: false,
        migrations: 0,
      });
      // and TRUNCATE works again
      await db.admin.unsafe("truncate st");
    },
  );

  it("a slot and publication left by a crashed start: status reports them (exit 2), abort removes them", async () => {
    await createOrders(db.admin, "leftover");
    const oid = await oidOf(db.admin, "leftover");
    const names = logicalNames(oid);
    await db.admin.unsafe(`create publication "${names.publication}" for table leftover`);
    await db.admin`select pg_create_logical_replication_slot(${names.slot}, 'pgoutput')`;
    expect(await streamObjects(db.admin, "leftover")).toEqual({
      slots: [names.slot],
      publications: [names.publication],
      shadow: false,
      migrations: 0,
    });

    const s1 = await pgshift(["status", "leftover"]);
    const err = expectRefusal(
      s1,
      "no migration of public.leftover is in progress",
      `replication slot ${names.slot}`,
      `publication ${names.publication}`,
    );
    expect(err).toContain("crashed start left");
    expect(s1.stderr).toContain("pgshift abort public.leftover");

    const ab = await pgshift(["abort", "leftover"]);
    expect(ab.code, describeRun(ab)).toBe(0);
    expect(await streamObjects(db.admin, "leftover")).toEqual({
      slots: [],
      publications: [],
      shadow: false,
      migrations: 0,
    });

    const s2 = await pgshift(["status", "leftover"]);
    const err2 = expectRefusal(s2, "no migration of public.leftover is in progress");
    expect(err2).not.toContain("crashed start");
  });

  /** Exit status and output of a child, for assertion messages. */
  const described = (
    r: Running,
    ex: { code: number | null; signal: NodeJS.Signals | null; timedOut: boolean },
    ms: number,
  ) =>
    `exit ${String(ex.code)} ${String(ex.signal)}${
      ex.timedOut ? ` (did not exit within ${ms} ms: killed)` : ""
    }\n--- stdout\n${r.out.stdout}--- stderr\n${r.out.stderr}`;

  // Regression: a refused START_REPLICATION (slot in use) ends Applier.start() with an error instead of a hang.
  it("a second pgshift sync on the same table is refused (exit 2) while the first one streams", async () => {
    const { names } = await startLogical("twosync", 100);
    const first = await startSync("twosync", names.slot);
    try {
      const second = spawnCli(["sync", "twosync", "--url", db.url]);
      const ex = await exitWithin(second, 8_000);
      expect(ex.code, described(second, ex, 8_000)).toBe(2);
      expect(second.out.stderr, described(second, ex, 8_000)).toContain(
        `pgshift: error: replication slot ${names.slot} is in use by another process`,
      );
    } finally {
      // (its clean exit is tested elsewhere)
      first.child.kill("SIGKILL");
      await first.exited;
      await pgshift(["abort", "twosync"]);
    }
  });

  // Regression: Applier.stop() clears its 5 s guard timer, so sync exits right after Ctrl-C.
  it("pgshift sync exits promptly (within 2 s) after SIGINT", async () => {
    await createOrders(db.admin, "quick", 50);
    const names = logicalNames(await oidOf(db.admin, "quick"));
    await startMigration(
      db.sql,
      { schema: "public", name: "quick" },
      { allowKeyExtension: true, spec: parsePartitionSpec("range:created_at:month"), mode: "logical" },
    );
    const sync = await startSync("quick", names.slot);
    try {
      sync.child.kill("SIGINT");
      const ex = await exitWithin(sync, 2_000);
      expect(ex.timedOut, described(sync, ex, 2_000)).toBe(false);
      expect(ex.code, described(sync, ex, 2_000)).toBe(0);
    } finally {
      await sync.exited;
      await pgshift(["abort", "quick"]);
    }
  });

  it(
    "cutover while pgshift sync runs: cutover waits for sync to apply, drops slot and publication; sync ends by " +
      "itself",
    async () => {
      const { table, names } = await startLogical("cosync", 500);
      await backfill(db.sql, table, { batchSize: 100 });
      const sync = await startSync("cosync", names.slot);
      await db.admin`update cosync set note = 'during sync' where id % 7 = 0`;
      await db.admin`insert into cosync (created_at, note) values ('2025-04-04', 'during sync')`;
      await cutover(db.sql, table);
      expect(await streamObjects(db.admin, "cosync")).toMatchObject({ slots: [], publications: [], migrations: 1 });
      // The retired table got every change through sync (cutover itself never attached to the slot).
      expect(
        (await db.admin`select count(*)::int as n from cosync_pgshift_retired where note = 'during sync'`)[0]!.n,
      ).toBe(72);
      expect((await verify(db.sql, table)).equal).toBe(true);
      const ex = await exitWithin(sync, 10_000);
      // Usually sync exits 0 by itself ("the migration is cut over"). It may instead hang when its 1 s tick falls
      // between cutover terminating its stream and clearing slot_name (the race the it.fails test below makes
      // deterministic for abort); this test does not depend on that timing.
      if (!ex.timedOut) {
        expect(ex.code, described(sync, ex, 10_000)).toBe(0);
        expect(sync.out.stdout, described(sync, ex, 10_000)).toContain("sync finished: the migration is cut over");
      }
      await finalize(db.sql, table, { yes: true });
      expect(await streamObjects(db.admin, "cosync")).toEqual({
        slots: [],
        publications: [],
        shadow: false,
        migrations: 0,
      });
    },
  );

  // Regression: sync notices a slot dropped by abort or cutover and exits 0 instead of reattaching to nothing.
  it("abort while pgshift sync runs (abort's transaction waiting for a lock): sync exits 0 by itself", async () => {
    const { names } = await startLogical("absync", 300);
    const sync = await startSync("absync", names.slot);
    const lock = await holdRowExclusive("absync");
    try {
      const abort = pgshift(["abort", "absync", "--lock-timeout", "10000", "--retries", "0"]);
      // abort drops the stream first, then waits for the lock; sync's next tick sees its stream terminated.
      await waitUntil("abort dropped the slot", async () => !(await slotRow(db.admin, names.slot)).exists, 15_000);
      await sleep(1500);
      await lock.release();
      const ab = await abort;
      expect(ab.code, describeRun(ab)).toBe(0);
      expect(await streamObjects(db.admin, "absync")).toEqual({
        slots: [],
        publications: [],
        shadow: false,
        migrations: 0,
      });
      const ex = await exitWithin(sync, 8_000);
      expect(ex.code, described(sync, ex, 8_000)).toBe(0);
      expect(sync.out.stdout, described(sync, ex, 8_000)).toContain("sync finished: the migration is gone");
    } finally {
      await lock.release();
      if (sync.child.exitCode === null && sync.child.signalCode === null) sync.child.kill("SIGKILL");
    }
  });

  it("cutover drops the slot and publication; finalize leaves none", async () => {
    const { table, names } = await startLogical("fin", 500);
    await db.admin`update fin set note = 'changed' where id % 10 = 0`;
    await backfill(db.sql, table, { batchSize: 100 });
    await db.admin`insert into fin (created_at, note) values ('2025-03-03', 'late')`;
    expect(await streamObjects(db.admin, "fin")).toEqual({
      slots: [names.slot],
      publications: [names.publication],
      shadow: true,
      migrations: 1,
    });
    await cutover(db.sql, table);
    const after = await streamObjects(db.admin, "fin");
    expect(after.slots).toEqual([]);
    expect(after.publications).toEqual([]);
    const m = (await loadMigration(db.admin, table))!;
    expect(m.phase).toBe("cutover");
    expect(m.slot_name).toBeNull();
    expect(m.publication_name).toBeNull();
    const v = await verify(db.sql, table);
    expect(v.equal).toBe(true);
    await finalize(db.sql, table, { yes: true });
    expect(await streamObjects(db.admin, "fin")).toEqual({ slots: [], publications: [], shadow: false, migrations: 0 });
    expect((await db.admin`select count(*)::int as n from fin where note = 'changed'`)[0]!.n).toBe(50);
    expect((await db.admin`select count(*)::int as n from fin`)[0]!.n).toBe(501);
  });
});

describe("dropping the publication while the application updates and deletes", () => {
  // PostgreSQL looks a publication up by OID while an UPDATE or DELETE on a published table checks its replica
  // identity: a plain DROP PUBLICATION in between makes the application's statement fail with "cache lookup
  // failed for publication" (dozens of failures per second of this loop). dropStream takes SHARE locks first.
  it("dropStream never makes an application statement fail", async () => {
    await db.admin.unsafe(`
      create table pubrace (id bigint primary key, v int not null);
      insert into pubrace select i, 0 from generate_series(1, 1000) i;`);
    const table = tableRef(db.admin, { schema: "public", name: "pubrace" });
    let running = true;
    const errors: string[] = [];
    let writes = 0;
    const workers = [0, 1, 2].map(async (wi) => {
      const c = await connect({ url: db.url });
      try {
        for (let i = 0; running; i++) {
          const id = 1 + wi + 3 * Math.floor(Math.random() * 333);
          try {
            if (i % 10 === 9)
              await c.begin(async (tx) => {
                await tx`delete from ${tableRef(tx, { schema: "public", name: "pubrace" })} where id = ${id}`;
                await tx`insert into ${tableRef(tx, { schema: "public", name: "pubrace" })} values (${id}, 0)`;
              });
            else await c`update ${tableRef(c, { schema: "public", name: "pubrace" })} set v = v + 1 where id = ${id}`;
            writes++;
          } catch (err) {
            errors.push(err instanceof Error ? err.message : String(err));
          }
        }
      } finally {
        await c.end({ timeout: 5 });
      }
    });
    let cycles = 0;
    const until = Date.now() + 4000;
    try {
      while (Date.now() < until) {
        await db.admin`create publication pgshift_race for table ${table}`;
        await dropStream(db.sql, null, "pgshift_race", { lockTimeoutMs: 200, retries: 30 });
        cycles++;
      }
    } finally {
      running = false;
      await Promise.all(workers);
    }
    expect([...new Set(errors)]).toEqual([]);
    expect(cycles).toBeGreaterThan(50);
    expect(writes).toBeGreaterThan(1000);
    expect((await db.admin`select count(*)::int as n from pg_publication where pubname = 'pgshift_race'`)[0]!.n).toBe(
      0,
    );
  });
});

describe("--dry-run in logical mode", () => {
  it(
    "abort --dry-run prints the slot and publication statements among the rest, changes nothing; abort then runs " +
      "exactly those",
    async () => {
      const { table, names } = await startLogical("dryab", 300);
      const before = await catalogSnapshot(db.admin);
      const dry = await pgshift(["abort", "dryab", "--dry-run"]);
      expect(dry.code, describeRun(dry)).toBe(0);
      const printed = dry.stdout.trim().split("\n");
      const at = (pattern: string) => printed.findIndex((l) => l.includes(pattern));
      expect(at(`pg_drop_replication_slot('${names.slot}')`), dry.stdout).toBeGreaterThanOrEqual(0);
      expect(at("IN SHARE MODE"), dry.stdout).toBeGreaterThan(at("pg_drop_replication_slot"));
      expect(at(`DROP PUBLICATION IF EXISTS "${names.publication}"`), dry.stdout).toBe(at("IN SHARE MODE") + 1);
      expect(at("DROP TABLE IF EXISTS"), dry.stdout).toBeGreaterThan(at("DROP PUBLICATION"));
      expect(await catalogSnapshot(db.admin)).toEqual(before);
      expect(await streamObjects(db.admin, "dryab")).toEqual({
        slots: [names.slot],
        publications: [names.publication],
        shadow: true,
        migrations: 1,
      });
      const done = await abort(db.sql, table);
      // The printed statements, without the comments (where each runs, the checks between).
      const statements = printed.filter((l) => !l.startsWith("--")).join("\n");
      expect(done.statements.map((s) => `${s};`).join("\n")).toBe(statements);
      expect(await streamObjects(db.admin, "dryab")).toEqual({
        slots: [],
        publications: [],
        shadow: false,
        migrations: 0,
      });
    },
  );

  it(
    "cutover --dry-run prints the lock and WAL position before the renames, the slot and publication drop after; " +
      "changes nothing",
    async () => {
      const { table, names } = await startLogical("drycut", 300);
      await backfill(db.sql, table, { batchSize: 100 });
      const before = await catalogSnapshot(db.admin);
      const dry = await pgshift(["cutover", "drycut", "--dry-run"]);
      expect(dry.code, describeRun(dry)).toBe(0);
      // The statements, without the comments and the transactions' BEGIN, SET LOCAL lock_timeout and COMMIT.
      const lines = dry.stdout
        .trim()
        .split("\n")
        .filter((l) => !/^(--|BEGIN;|SET LOCAL lock_timeout|COMMIT;)/.test(l));
      // Before any lock the WAL position the stream catches up to and the look for sessions holding the tables
      // (issue 16); then the lock of the live table and, under it, the WAL position read again.
      const lock = lines.indexOf('LOCK TABLE "public"."drycut" IN ACCESS EXCLUSIVE MODE;');
      expect(lock, dry.stdout).toBeGreaterThan(1);
      expect(lines[0]).toBe("SELECT pg_current_wal_insert_lsn();");
      expect(lines.slice(1, lock).join("\n")).toContain("pg_cancel_backend");
      expect(lines.slice(lock, lock + 2)).toEqual([
        'LOCK TABLE "public"."drycut" IN ACCESS EXCLUSIVE MODE;',
        "SELECT pg_current_wal_insert_lsn();",
      ]);
      expect(lines.at(-1)).toBe(`DROP PUBLICATION IF EXISTS "${names.publication}";`);
      expect(lines.some((l) => l.includes(`pg_drop_replication_slot('${names.slot}')`))).toBe(true);
      expect(await catalogSnapshot(db.admin)).toEqual(before);
      // The publication's table, as printed, is the original table under its retired name after the cutover.
      const share = lines.find((l) => l.endsWith("IN SHARE MODE;"))!;
      const oidBefore = await oidOf(db.admin, "drycut");
      await cutover(db.sql, table);
      const retired = share.slice("LOCK TABLE ".length, -" IN SHARE MODE;".length);
      expect((await db.admin`select ${retired}::regclass::oid::int as oid`)[0]!.oid).toBe(oidBefore);
      expect(await streamObjects(db.admin, "drycut")).toMatchObject({ slots: [], publications: [] });
    },
  );
});
