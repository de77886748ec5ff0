import { randomBytes, randomUUID } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { connect, type Sql, type TxSql, transaction } from "../../src/db.js";
import { sqlState } from "../../src/errors.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration, requireStream } from "../../src/migration/state.js";
import { Applier, type ApplierProgress } from "../../src/mirror/apply.js";
import { ChangeBatch } from "../../src/mirror/changes.js";
import { flushWal } from "../../src/mirror/stream.js";
import { type QualifiedName, quoteIdent, quoteQualified } from "../../src/names.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";

/**
 * The logical-replication applier against values of many types and awkward names: a table in a schema
 * named `Odd "Schema"`, with a space and quotes in its name and in column names, an enum and a domain in
 * another awkward schema (and a composite type, arrays of the enum, ranges, timetz, point, json, numeric,
 * floats, bytea, bit strings, ...), a large TOASTed text and a generated column, partitioned by month on a column
 * that is not in the primary key. An independent twin receives the same changes in the same transactions;
 * scripted and seeded-random transactions run before, during and after the backfill (same row many times,
 * primary-key changes with the old key reused, partition moves and back, delete and re-insert, NULLs and
 * back, updates that leave the TOASTed value alone, more than 2,000 changes of overlapping keys in one
 * transaction, hundreds of small transactions over a few hot keys, a rolled-back transaction). After the
 * stream is applied, the shadow equals the twin column by column as text (two-way EXCEPT ALL), holds
 * each id once, and verify() agrees: the coalesced, set-based apply gives what the changes one by one gave.
 * The last tests pin down bugs found by this file (names with dots, database-level output settings).
 */

let db: TestDatabase;
/**
 * The connection the test writes through: values go as the text written here (rawText), not through
 * postgres.js's serializers (which turn timestamp parameters into a Date, losing microseconds and infinity).
 */
let writer: Sql;

const SOURCE: QualifiedName = { schema: 'Odd "Schema"', name: 'line "items" 2025' };
const TWIN: QualifiedName = { schema: 'Twin "Schema"', name: 'line "items" 2025' };
const TYPES_SCHEMA = 'Types "Sch"';
const ENUM = `${quoteIdent(TYPES_SCHEMA)}.${quoteIdent('Mood "e"')}`;
const DOMAIN = `${quoteIdent(TYPES_SCHEMA)}.${quoteIdent("short text")}`;
const COMPOSITE = `${quoteIdent(TYPES_SCHEMA)}.${quoteIdent("pair (a, b)")}`;

/** The value columns with their types, in table order (after id and created_at; `big` and `gen` follow). */
const VALUE_COLUMNS: [string, string][] = [
  ["t", "text"],
  ["Mixed Case col", "text"],
  ['quote"col', "text"],
  ["j", "json"],
  ["jb", "jsonb"],
  ["n20", "numeric(20,6)"],
  ["n", "numeric"],
  ["tstz", "timestamptz"],
  ["ts", "timestamp"],
  ["d", "date"],
  ["iv", "interval"],
  ["b", "bytea"],
  ["u", "uuid"],
  ["ia", "int[]"],
  ["ta", "text[]"],
  ["e", ENUM],
  ["dom", DOMAIN],
  ["c5", "char(5)"],
  ["b4", "bit(4)"],
  ["vb", "varbit"],
  ["flag", "boolean"],
  ["ip", "inet"],
  ["f8", "double precision"],
  ["f4", "real"],
  ["cp", COMPOSITE],
  ["r", "tstzrange"],
  ["ea", `${ENUM}[]`],
  ["tt", "timetz"],
  ["pt", "point"],
];
const VAL_COLS = VALUE_COLUMNS.map(([c]) => c);
/** Every column pgshift copies: all but the generated one. */
const COLS = ["id", "created_at", ...VAL_COLS, "big"];

const TEXTS = [
  `it's "quoted" \\ back\\slash {braces} [brackets], commas;\nnew line\r\ncrlf\ttab`,
  "",
  "NULL",
  "\\N",
  "🎉 emoji ünïcödé ∑ 𝔘 日本語 \u200b zero-width",
  "  leading and trailing spaces  ",
  '{"looks": "like json"}',
  "a,b,c",
  "\\x00",
  "'; drop table x; --",
];

/** Awkward values of each value column, as text (what a client would send). */
const POOLS: Record<string, readonly string[]> = {
  t: TEXTS,
  "Mixed Case col": [...TEXTS].reverse(),
  'quote"col': ['"', "''", "\\", "{", "}", ",", " ", "\t"],
  // json keeps its text exactly: whitespace, duplicate keys, escapes (even \u0000, which jsonb refuses)
  j: [
    ' { "a" : 1 , "a" : 2 }  ',
    "null",
    '"str with \\"escapes\\" and \\u00e9 and \\ud83c\\udf89"',
    "[1, 2.50, 1e3, -0, 1.0E+2]",
    '{"nested": {"k": [true, false, null]}, "emoji": "🎉", "nl": "a\\nb"}',
    "  42  ",
    '{"nul": "\\u0000"}',
    "{}",
  ],
  jb: [
    '{"b": 1, "a": [1, 2, {"c": null}], "a": "dup"}',
    "null",
    '"x"',
    "[]",
    '{"num": 1.50, "big": 123456789012345678901234567890.5, "e": 1e-7}',
    '{"": ""}',
  ],
  n20: ["12345678901234.123456", "-0.000001", "0", "99999999999999.999999", "1.5", "-99999999999999.999999"],
  n: [
    "123456789012345678901234567890.123456789012345678901234567890",
    "NaN",
    "Infinity",
    "-Infinity",
    "-0.00000000000000000000000000000000001",
    "1e-100",
    "0.000",
    "-0",
  ],
  tstz: [
    "2025-03-15 12:34:56.123456+00",
    "infinity",
    "-infinity",
    "1999-12-31 23:59:59.999999-08",
    "0044-03-15 12:00:00+00 BC",
    "2000-01-01 00:00:00.000001+05:30",
  ],
  ts: [
    "2025-03-15 12:34:56.654321",
    "infinity",
    "-infinity",
    "4713-01-01 00:00:00 BC",
    "294276-12-31 23:59:59.999999",
    "2024-02-29 00:00:00",
  ],
  d: ["2025-02-28", "infinity", "-infinity", "0001-01-01 BC", "5874897-12-31", "2000-02-29"],
  iv: [
    "1 year 2 mons 3 days 04:05:06.789012",
    "-1 days +02:00:00",
    "-1 days -02:00:00",
    "00:00:00.000001",
    "-178000000 years",
    "1 mon -1 days",
    "P1Y2M3DT4H5M6.5S",
    "infinity",
  ],
  b: ["\\x00ff00", "\\x", "\\x00", "\\xdeadbeef0000", "\\x5c78"],
  u: ["00000000-0000-0000-0000-000000000000", randomUUID(), randomUUID(), "ffffffff-ffff-ffff-ffff-ffffffffffff"],
  ia: ["{1,NULL,3}", "{}", "{{1,2},{3,4}}", "[0:2]={7,8,9}", "{-2147483648,2147483647}", "{NULL}"],
  ta: [`{"a\\"b",NULL,"NULL","c,d","","x\\\\y"," sp ","{}","🎉"}`, "{}", "{{a,b},{c,d}}", '{"line\nbreak"}'],
  e: ["it's", 'Ünïcode "q"', "plain", "has space"],
  dom: ["ok", "", 'with "quotes" and \\'],
  c5: ["ab", "abcde", "", " x", "é€"],
  b4: ["1010", "0000", "1111", "0001"],
  vb: ["", "1", "101010101010101010101", "0"],
  flag: ["true", "false"],
  ip: ["192.168.0.1/24", "::1", "10.0.0.1", "2001:db8::1/64", "::ffff:1.2.3.4"],
  f8: [
    "0.1",
    "1e308",
    "-0",
    "NaN",
    "Infinity",
    "-Infinity",
    "5e-324",
    "0.30000000000000004",
    "1.7976931348623157e308",
    "-2.2250738585072014e-308",
    "123456789.12345679",
  ],
  f4: ["0.1", "-0", "NaN", "3.4028235e+38", "1e-45", "-Infinity", "1.0000001"],
  cp: ['(1,"q ""x""")', "(,)", '(-5,"")', '(2147483647,"🎉, (paren)")'],
  r: [
    "[2025-01-01 00:00:00.000001+00,infinity)",
    "empty",
    "(,)",
    "[2025-03-01 00:00:00+00,2025-03-01 00:00:00.000001+00]",
  ],
  ea: ['{"it\'s","Ünïcode \\"q\\"",NULL}', "{}", "{plain,plain}"],
  tt: ["12:34:56.789012+05:30", "00:00:00-15:59", "24:00:00+00"],
  pt: ["(0.1,1e308)", "(-0,NaN)", "(1.5,-2.25)"],
};

type Row = Record<string, string | null>;

/** Values of every value column for variant `v`: a different mix of the pools (and a few NULLs) per variant. */
function vals(v: number): Row {
  const row: Row = {};
  VAL_COLS.forEach((c, k) => {
    const pool = POOLS[c]!;
    row[c] = (v + k) % 11 === 0 ? null : pool[(v + k * 7) % pool.length]!;
  });
  return row;
}

/** Every value column NULL. */
const nulls = (): Row => Object.fromEntries(VAL_COLS.map((c) => [c, null]));

const pad = (n: number, w = 2) => String(n).padStart(w, "0");
/** A created_at in `month` of `year` with microseconds, varied by id. */
const at = (month: number, id: number, year = 2025) =>
  `${year}-${pad(month)}-${pad(1 + (id % 27))} ` +
  `${pad(id % 24)}:${pad((id * 7) % 60)}:${pad((id * 13) % 60)}.${pad((id * 7919) % 1_000_000, 6)}+00`;

/** 100,000 characters of random hex: stored out of line (pglz cannot shrink it below the TOAST threshold). */
const bigText = () => randomBytes(50_000).toString("hex");

const fullRow = (id: number, createdAt: string, v: number, big: string | null): Row => ({
  id: String(id),
  created_at: createdAt,
  ...vals(v),
  big,
});

/** A small deterministic PRNG (mulberry32): rnd(n) is an integer in [0, n). */
function prng(seed: number): (n: number) => number {
  let a = seed >>> 0;
  return (n: number) => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return Math.floor((((t ^ (t >>> 14)) >>> 0) / 4294967296) * n);
  };
}

const SRC_Q = quoteQualified(SOURCE);
const TWIN_Q = quoteQualified(TWIN);

/** Rows changed in the source by the current transaction (see txn). */
let rowsChanged = 0;

/** Runs a statement on the source, then on the twin, in the same transaction; both must touch as many rows. */
async function both(tx: TxSql, text: (t: string) => string, params: (string | null)[] = []): Promise<number> {
  const a = await tx.unsafe(text(SRC_Q), params);
  const b = await tx.unsafe(text(TWIN_Q), params);
  expect(b.count, `twin out of step: ${text(SRC_Q)}`).toBe(a.count);
  rowsChanged += a.count;
  return a.count;
}

function insertRows(tx: TxSql, rows: Row[], suffix = ""): Promise<number> {
  const n = COLS.length;
  const values = rows.map((_, r) => `(${COLS.map((_, c) => `$${r * n + c + 1}`).join(", ")})`).join(", ");
  return both(
    tx,
    (t) => `insert into ${t} (${COLS.map(quoteIdent).join(", ")}) values ${values} ${suffix}`,
    rows.flatMap((row) => COLS.map((c) => row[c] ?? null)),
  );
}

function update(tx: TxSql, id: number, set: Row): Promise<number> {
  const cols = Object.keys(set);
  return both(
    tx,
    (t) =>
      `update ${t} set ${cols.map((c, i) => `${quoteIdent(c)} = $${i + 1}`).join(", ")} where id = $${cols.length + 1}`,
    [...cols.map((c) => set[c] ?? null), String(id)],
  );
}

const changeId = (tx: TxSql, from: number, to: number) =>
  both(tx, (t) => `update ${t} set id = $1 where id = $2`, [String(to), String(from)]);
const del = (tx: TxSql, id: number) => both(tx, (t) => `delete from ${t} where id = $1`, [String(id)]);

/**
 * One transaction on the test database; retried from the start when the server rolls it back for a
 * deadlock with the backfill. @returns whether it changed any row of the source (else the stream skips it).
 */
async function txn(fn: (tx: TxSql) => Promise<unknown>): Promise<boolean> {
  for (let attempt = 1; ; attempt++) {
    try {
      rowsChanged = 0;
      await transaction(writer, fn);
      return rowsChanged > 0;
    } catch (err) {
      const code = sqlState(err);
      if (attempt < 20 && (code === "40P01" || code === "40001" || code === "55P03")) continue;
      throw err;
    }
  }
}

/** Ids given out to new rows and to primary-key changes (never reused by random transactions). */
const ids = { next: 100_000 };

/**
 * 1 to 6 random changes of rows among ids 1..hot (and of rows moved to new ids): value updates, the same row
 * many times, partition moves, primary-key changes with the old id re-inserted, delete and re-insert,
 * NULLs and back, small updates of rows with a TOASTed value, inserts, deletes.
 */
async function randomTxn(tx: TxSql, rnd: (n: number) => number, hot: number): Promise<void> {
  const ops = 1 + rnd(6);
  for (let i = 0; i < ops; i++) {
    const id = rnd(8) === 0 && ids.next > 100_000 ? 100_000 + rnd(ids.next - 100_000) : 1 + rnd(hot);
    const v = rnd(10_000);
    switch (rnd(10)) {
      case 0:
        await update(tx, id, vals(v));
        break;
      case 1: {
        const times = 2 + rnd(8);
        for (let k = 0; k < times; k++) await update(tx, id, k % 3 === 2 ? nulls() : vals(v + k));
        break;
      }
      case 2:
        await update(tx, id, { created_at: rnd(5) === 0 ? at(1 + rnd(12), id, 2001) : at(1 + rnd(8), id) });
        break;
      case 3:
        await changeId(tx, id, ids.next++);
        await insertRows(
          tx,
          [fullRow(id, at(1 + rnd(6), id), v, rnd(4) === 0 ? bigText() : null)],
          "on conflict (id) do nothing",
        );
        break;
      case 4:
        await del(tx, id);
        await insertRows(tx, [fullRow(id, at(1 + rnd(6), id), v, null)], "on conflict (id) do nothing");
        break;
      case 5:
        await update(tx, id, nulls());
        if (rnd(2) === 0) await update(tx, id, vals(v));
        break;
      case 6: {
        // rows with a TOASTed value (id % 40 = 0): the UPDATE leaves it alone, pgoutput sends it as unchanged
        const big = 40 * (1 + rnd(Math.max(1, Math.floor(hot / 40))));
        await update(tx, big, { flag: rnd(2) === 0 ? "true" : "false", t: TEXTS[rnd(TEXTS.length)]! });
        break;
      }
      case 7:
        await insertRows(tx, [fullRow(ids.next++, at(1 + rnd(8), id), v, rnd(10) === 0 ? bigText() : null)]);
        break;
      case 8:
        await del(tx, id);
        break;
      default: {
        const c = VAL_COLS[rnd(VAL_COLS.length)]!;
        await update(tx, id, { [c]: vals(v)[c] ?? null });
      }
    }
  }
}

/** Two-way EXCEPT ALL of `a` and `b` over `cols`, each column compared as its text. */
async function compareText(
  a: QualifiedName,
  b: QualifiedName,
  cols: readonly string[] = COLS,
): Promise<{ onlyInA: number; onlyInB: number; rowsA: number; rowsB: number }> {
  const list = cols.map((c) => `${quoteIdent(c)}::text`).join(", ");
  const qa = quoteQualified(a);
  const qb = quoteQualified(b);
  const r = await db.admin.unsafe(`
    select (select count(*) from (select ${list} from ${qa} except all select ${list} from ${qb}) x)::int as a,
           (select count(*) from (select ${list} from ${qb} except all select ${list} from ${qa}) y)::int as b,
           (select count(*) from ${qa})::int as na,
           (select count(*) from ${qb})::int as nb`);
  return { onlyInA: Number(r[0]!.a), onlyInB: Number(r[0]!.b), rowsA: Number(r[0]!.na), rowsB: Number(r[0]!.nb) };
}

/** What the applier did, observed through ChangeBatch.write and Applier.applyPartialUpdate (spied on). */
const seen = { writes: [] as { changes: number; keys: number }[], partial: 0 };

/**
 * Applies the stream up to the current end of WAL with an Applier of this process, then detaches.
 * @returns the progress reported at each commit of the shadow (one per group of source transactions).
 */
async function applyStream(
  table: QualifiedName = SOURCE,
): Promise<{ commits: ApplierProgress[]; changes: number; exactGroups: number }> {
  const m = (await loadMigration(db.sql, table))!;
  const target = String((await db.admin`select pg_current_wal_insert_lsn()::text as l`)[0]!.l);
  await flushWal(db.sql);
  const commits: ApplierProgress[] = [];
  const applier = new Applier(requireStream(m), { url: db.url, onCommit: (p) => commits.push(p) });
  await applier.start();
  try {
    expect(await applier.waitFor(target, 30_000)).toBe(true);
    expect(applier.error).toBeNull();
  } finally {
    await applier.stop();
  }
  return { commits, changes: applier.changes, exactGroups: applier.exactGroups };
}

beforeAll(async () => {
  db = await freshDatabase();
  writer = await connect({ url: db.url, max: 2, rawText: true });
  const version = Number((await db.admin`select current_setting('server_version_num')::int as v`)[0]!.v);
  if (version < 170000) POOLS.iv = POOLS.iv!.filter((x) => x !== "infinity"); // infinite intervals: PostgreSQL 17+
  // Count what the applier does (it runs in this process): the changes and distinct keys each batch write
  // held, and the updates that went through the partial (unchanged TOAST) path. This reads private members
  // (ChangeBatch.finals, Applier.applyPartialUpdate): the assertions on `seen` say so if they are renamed.
  const write = ChangeBatch.prototype.write;
  vi.spyOn(ChangeBatch.prototype, "write").mockImplementation(async function (this: ChangeBatch, tx: TxSql) {
    const finals = (this as unknown as { finals?: unknown }).finals;
    const keys = finals instanceof Map ? finals.size : -1;
    if (keys !== 0) seen.writes.push({ changes: this.changes, keys });
    return write.call(this, tx);
  });
  const proto = Applier.prototype as unknown as { applyPartialUpdate: (...args: unknown[]) => Promise<void> };
  const partial = proto.applyPartialUpdate;
  expect(typeof partial, "Applier.applyPartialUpdate (spied on) exists").toBe("function");
  vi.spyOn(proto, "applyPartialUpdate").mockImplementation(async function (this: unknown, ...args: unknown[]) {
    seen.partial++;
    return partial.apply(this, args);
  });
});

afterAll(async () => {
  vi.restoreAllMocks();
  await writer?.end({ timeout: 5 });
  if (!db) return;
  await db.admin`select pg_drop_replication_slot(slot_name) from pg_replication_slots where database =
    current_database() and not active`.catch(() => {});
  await db.close();
});

describe("logical apply: types, awkward names, coalesced batches", () => {
  it(
    "every value survives the stream exactly, and the set-based apply equals the changes applied one by one " +
      "(twin)",
    async () => {
      const ddl = (t: string) => `create table ${t} (
      id bigint primary key,
      created_at timestamptz not null,
      ${VALUE_COLUMNS.map(([c, type]) => `${quoteIdent(c)} ${type}`).join(",\n      ")},
      big text,
      gen text generated always as (id::text || '|' || coalesce(md5(big), '-') || '|' || coalesce(t, '-')) stored
    )`;
      await db.admin.unsafe(`
      create schema ${quoteIdent(SOURCE.schema)};
      create schema ${quoteIdent(TWIN.schema)};
      create schema ${quoteIdent(TYPES_SCHEMA)};
      create type ${ENUM} as enum ('it''s', 'Ünïcode "q"', 'plain', 'has space');
      create domain ${DOMAIN} as text check (value <> 'forbidden' and length(value) <= 40);
      create type ${COMPOSITE} as (${quoteIdent("A")} int, ${quoteIdent('b "2"')} text);
      ${ddl(SRC_Q)};
      ${ddl(TWIN_Q)};`);

      // Seed: 800 rows over January to June 2025; every 40th with a 100 kB TOASTed value. Random transactions
      // change ids 1..200, the large transaction ids up to 600, the scripted ones ids 601..800.
      await txn(async (tx) => {
        for (let from = 1; from <= 800; from += 50) {
          const rows: Row[] = [];
          for (let id = from; id < from + 50; id++)
            rows.push(fullRow(id, at(1 + (id % 6), id), id, id % 40 === 0 ? bigText() : null));
          await insertRows(tx, rows);
        }
      });
      await db.admin.unsafe(`analyze ${SRC_Q}`);
      const toast = await db.admin`select pg_relation_size(reltoastrelid)::bigint > 0 as ok from pg_class where oid =
        to_regclass(${SRC_Q})`;
      expect(toast[0]!.ok, "the large values are stored out of line").toBe(true);

      await startMigration(db.sql, SOURCE, {
        allowKeyExtension: true,
        spec: parsePartitionSpec("range:created_at:month"),
        mode: "logical",
        now: new Date("2025-06-15T00:00:00Z"),
      });
      const m = (await loadMigration(db.sql, SOURCE))!;
      const SHADOW = m.partitioned;
      expect(m.mode).toBe("logical");
      expect(m.copy_columns, "every column but the generated one is copied").toEqual(COLS);
      expect(m.shadow_key).toEqual(["id", "created_at"]);
      const parts = await db.admin`select count(*)::int as n from pg_inherits where inhparent =
        to_regclass(${quoteQualified(SHADOW)})`;
      expect(parts[0]!.n, "2025-01 .. 2025-09 and DEFAULT").toBe(10);

      // Before the backfill: changes the stream carries for rows the backfill has not copied yet.
      await txn(async (tx) => {
        await insertRows(
          tx,
          [1001, 1002, 1003].map((id) => fullRow(id, at(2, id), id * 3, null)),
        );
        for (let v = 0; v < 25; v++) await update(tx, 601, v % 5 === 4 ? nulls() : vals(v)); // the same row 25 times
        await del(tx, 602);
        await insertRows(tx, [fullRow(602, at(5, 602), 77, null)]); // delete and re-insert (another partition)
      });
      await txn(async (tx) => {
        await changeId(tx, 603, 2603); // primary key change, then the old id reused
        await insertRows(tx, [fullRow(603, at(3, 603), 5, bigText())]);
      });
      await txn(async (tx) => {
        await update(tx, 604, { created_at: at(8, 604) }); // to a premade partition
        await update(tx, 605, { created_at: "2001-02-03 04:05:06.789012+00" }); // to DEFAULT
      });
      await txn((tx) => update(tx, 606, nulls()));
      await txn((tx) =>
        update(tx, 760, { flag: "true", "Mixed Case col": "TOAST untouched, " + "before " + "backfill" }),
      ); // partial, row not in the shadow
      await txn((tx) => update(tx, 720, { created_at: at(7, 720) })); // partial and moved, row not in the shadow

      // During the backfill (it applies the stream while it copies): random transactions over ids 1..200.
      const rndB = prng(20250615);
      let during = 0;
      let whileCopying = 0;
      let copying = true;
      const bf = backfill(db.sql, SOURCE, { batchSize: 40, sleepMs: 25 }).finally(() => (copying = false));
      while (copying || during < 40) {
        await txn((tx) => randomTxn(tx, rndB, 200));
        during++;
        if (copying) whileCopying++;
      }
      const bfr = await bf;
      expect(bfr.complete).toBe(true);
      expect(bfr.rowsCopied).toBeGreaterThan(750);
      expect(whileCopying, "transactions committed while the backfill ran").toBeGreaterThan(5);
      await applyStream();
      expect(await compareText(SOURCE, TWIN)).toMatchObject({ onlyInA: 0, onlyInB: 0 });
      const mid = await compareText(SHADOW, TWIN);
      expect(mid, "shadow vs twin after the backfill").toEqual({
        onlyInA: 0,
        onlyInB: 0,
        rowsA: mid.rowsB,
        rowsB: mid.rowsB,
      });
      expect(mid.rowsB).toBeGreaterThan(750);

      // After the backfill, with no applier attached: a backlog the applier takes in groups of transactions.
      const writesBefore = seen.writes.length;
      const partialBefore = seen.partial;
      // 300 small transactions over 40 hot keys: many changes of the same keys across transactions.
      const rndC = prng(42);
      let sent = 0;
      for (let i = 0; i < 300; i++) if (await txn((tx) => randomTxn(tx, rndC, 40))) sent++;
      // scripted: the same row 30 times in one transaction, with moves there and back and NULLs and back
      await txn(async (tx) => {
        for (let k = 0; k < 30; k++) {
          if (k % 10 === 3) await update(tx, 647, { created_at: at(8, 647) });
          else if (k % 10 === 4) await update(tx, 647, { created_at: "2001-01-01 00:00:00+00" });
          else if (k % 10 === 5) await update(tx, 647, { created_at: at(1 + (647 % 6), 647) });
          else await update(tx, 647, k % 7 === 6 ? nulls() : vals(1000 + k));
        }
      });
      // moves there and back, delete and re-insert, NULLs and back, each across transactions
      await txn((tx) => update(tx, 648, { created_at: at(9, 648) }));
      await txn((tx) => update(tx, 648, { created_at: at(1 + (648 % 6), 648) }));
      await txn((tx) => del(tx, 649));
      await txn((tx) => insertRows(tx, [fullRow(649, at(4, 649), 4949, null)]));
      await txn((tx) => update(tx, 650, nulls()));
      await txn((tx) => update(tx, 650, vals(5050)));
      // two keys swapped through a third, and a freed one reused, in one transaction
      await txn(async (tx) => {
        expect(await changeId(tx, 651, 900_651)).toBe(1);
        expect(await changeId(tx, 652, 651)).toBe(1);
        expect(await changeId(tx, 900_651, 652)).toBe(1);
        expect(await changeId(tx, 653, 900_653)).toBe(1);
        await insertRows(tx, [fullRow(653, at(6, 653), 5353, null)]);
      });
      // the TOASTed value left alone: in place, with a partition move, with a primary-key change
      await txn((tx) => update(tx, 800, { flag: "false", n: "3.14159265358979323846264338327950288" }));
      await txn((tx) => update(tx, 680, { created_at: at(8, 680), t: "moved, TOAST unchanged" }));
      await txn(async (tx) => expect(await changeId(tx, 640, 900_640)).toBe(1));
      await txn(async (tx) => {
        // inserted with a TOASTed value, then small updates in the same transaction: whole row, then partial ones
        await insertRows(tx, [fullRow(900_001, at(2, 900_001), 7, bigText())]);
        await update(tx, 900_001, { flag: "true" });
        await update(tx, 900_001, { created_at: at(5, 900_001), j: ' {"moved" :  true} ' });
        await changeId(tx, 900_001, 900_002);
        await update(tx, 900_002, nulls());
        // a TOASTed value replaced (whole row), then left alone again
        await update(tx, 760, { big: bigText() });
        await update(tx, 760, { t: "after a new TOASTed value" });
      });

      // One transaction with thousands of changes of overlapping keys (more than a batch holds).
      let bigTxnChanges = 0;
      await txn(async (tx) => {
        bigTxnChanges = 0;
        const count = async (p: Promise<number>) => (bigTxnChanges += await p);
        // first 4 rounds over the same ~600 rows without TOASTed values: whole rows only, past the 2,000 limit
        for (let round = 0; round < 4; round++) {
          await count(
            both(tx, (t) => `update ${t} set t = $1, n20 = $2 where id <= 600 and big is null`, [
              `round ${round} 🎉 "q" \\`,
              `${round}.5`,
            ]),
          );
        }
        for (let from = 0; from < 500; from += 100) {
          const rows: Row[] = [];
          for (let i = from; i < from + 100; i++)
            rows.push(fullRow(200_000 + i, at(1 + (i % 6), i), 3 * i, i % 100 === 0 ? bigText() : null));
          await count(insertRows(tx, rows));
        }
        await count(both(tx, (t) => `update ${t} set id = id + 300000 where id <= 600 and id % 6 = 1`));
        const reused: Row[] = [];
        for (let id = 1; id <= 600; id += 12) reused.push(fullRow(id, at(1 + (id % 6), id), 7 * id, null));
        await count(insertRows(tx, reused, "on conflict (id) do nothing"));
        await count(
          both(
            tx,
            (t) => `update ${t} set created_at = created_at + interval '2 months' where id <= 600 and id % 4 = 2`,
          ),
        );
        await count(
          both(
            tx,
            (t) => `update ${t} set created_at = created_at - interval '2 months' where id <= 600 and id % 8 = 2`,
          ),
        );
        await count(both(tx, (t) => `delete from ${t} where id >= 200000 and id < 200500 and id % 5 = 0`));
        const again: Row[] = [];
        for (let i = 0; i < 500; i += 10) again.push(fullRow(200_000 + i, at(1 + ((i + 3) % 6), i), 11 * i, null));
        await count(insertRows(tx, again));
        await count(
          both(
            tx,
            (t) => `update ${t} set "Mixed Case col" = null, ia = null, j = null where id >= 200000 and id % 3 = 0`,
          ),
        );
        await count(
          both(
            tx,
            (t) =>
              `update ${t} set "Mixed Case col" = 'back', ia = '[5:6]={1,NULL}', j = '{"b":1,  "b":2}' where id >= ` +
              `200000 and id % 6 = 0`,
          ),
        );
        // and a last round over every row, TOASTed ones included (partial updates between batched ones)
        await count(both(tx, (t) => `update ${t} set t = 'final round' where id <= 600`));
      });
      expect(bigTxnChanges).toBeGreaterThan(3500);

      // A rolled-back transaction leaves no trace.
      await expect(
        transaction(writer, async (tx) => {
          await insertRows(tx, [fullRow(9_000_001, at(3, 1), 1, bigText())]);
          await both(tx, (t) => `update ${t} set t = 'rolled back' where id <= 300`);
          await both(tx, (t) => `delete from ${t} where id between 301 and 350`);
          await changeId(tx, 351, 9_000_002);
          throw new Error("roll back on purpose");
        }),
      ).rejects.toThrow("roll back on purpose");
      // a last small transaction after it, with a json value the sanity check below normalises
      await txn((tx) => update(tx, 613, { j: ' { "a" : 1 , "a" : 2 } ', "Mixed Case col": "mc 613" }));

      const applied = await applyStream();
      // The copy is over and the stream past its end: the applier wrote in exact mode (no search for other
      // versions of rows already at their place), and the comparisons below hold all the same.
      expect(applied.exactGroups).toBeGreaterThan(0);
      // The backlog went in groups: at least one shadow transaction held several source transactions.
      const groups = applied.commits.map(
        (c, i) => c.transactions - (i === 0 ? 0 : applied.commits[i - 1]!.transactions),
      );
      expect(Math.max(...groups), `group sizes ${groups.join(",")}`).toBeGreaterThan(1);
      // (PostgreSQL 15+ does not send transactions that changed no row of the table; 14 sends them, empty, and
      // the applier counts them too)
      expect(applied.commits.at(-1)!.transactions).toBeGreaterThanOrEqual(sent + 14);
      const serverVersion = Number((await db.admin`select current_setting('server_version_num')::int as v`)[0]!.v);
      if (serverVersion >= 150000) expect(applied.commits.at(-1)!.transactions).toBeLessThanOrEqual(300 + 14 + 2);
      expect(applied.changes).toBeGreaterThan(bigTxnChanges);
      // Batches were coalesced (fewer keys written than changes) and one reached the 2,000-change limit;
      // unchanged TOASTed values went through the partial path.
      const writes = seen.writes.slice(writesBefore);
      expect(
        writes.some((w) => w.changes >= 2000),
        JSON.stringify(writes.slice(0, 20)),
      ).toBe(true);
      expect(
        writes.every((w) => w.keys > 0),
        "ChangeBatch.finals (read by the spy) is a Map",
      ).toBe(true);
      expect(writes.some((w) => w.keys < w.changes)).toBe(true);
      expect(seen.partial - partialBefore).toBeGreaterThan(10);

      // The script ran the same on the source and the twin.
      const srcTwin = await compareText(SOURCE, TWIN);
      expect(srcTwin).toMatchObject({ onlyInA: 0, onlyInB: 0 });
      expect(srcTwin.rowsA).toBe(srcTwin.rowsB);
      expect(srcTwin.rowsB).toBeGreaterThan(1000);

      // The shadow equals the twin, every copied column as text, and the generated column too.
      const res = await compareText(SHADOW, TWIN);
      expect(res).toEqual({ onlyInA: 0, onlyInB: 0, rowsA: srcTwin.rowsB, rowsB: srcTwin.rowsB });
      expect(await compareText(SHADOW, TWIN, ["id", "gen"])).toMatchObject({ onlyInA: 0, onlyInB: 0 });
      // Each id exactly once (no stale version left in another partition), spread over the partitions.
      const shape = await db.admin.unsafe(
        `select count(*)::int as rows, count(distinct id)::int as ids, count(distinct tableoid)::int as partitions,
              count(*) filter (where tableoid = (select c.oid from pg_class c join pg_namespace n on
                n.oid = c.relnamespace
                                                  where n.nspname = $1 and c.relname = $2))::int as in_default,
              count(*) filter (where id >= 9000000 or t = 'rolled back')::int as rolled_back,
              count(*) filter (where big is not null)::int as toasted
         from ${quoteQualified(SHADOW)}`,
        [SHADOW.schema, `${SOURCE.name}_default`],
      );
      expect(shape[0]).toMatchObject({ rows: srcTwin.rowsB, ids: srcTwin.rowsB, rolled_back: 0 });
      expect(shape[0]!.partitions).toBeGreaterThanOrEqual(8);
      expect(shape[0]!.in_default).toBeGreaterThan(0);
      expect(shape[0]!.toasted).toBeGreaterThan(10);
      // A few rows the script pinned down.
      const pinned = await db.admin.unsafe(
        `select id::int as id, created_at::text as at, t, j::text as j, big is not null as has_big, flag::text as flag,
        tableoid::regclass::text as part
         from ${quoteQualified(SHADOW)} where id in (603, 2603, 605, 613, 640, 900640, 649, 651, 652, 653, 900653,
           900001, 900002) order by id`,
      );
      const byId = new Map(pinned.map((r) => [Number(r.id), r]));
      expect([...byId.keys()]).toEqual([603, 605, 613, 649, 651, 652, 653, 2603, 900002, 900640, 900653]);
      expect(byId.get(613)!.j).toBe(' { "a" : 1 , "a" : 2 } ');
      expect(byId.get(605)!.part).toMatch(/_default"?$/);
      expect(byId.get(900640)!.has_big).toBe(true);
      expect(byId.get(603)!.has_big).toBe(true);
      expect(byId.get(900002)!.has_big).toBe(true);

      // The comparison catches a normalised json value and a value written as NULL; then both are undone.
      const shadowQ = quoteQualified(SHADOW);
      await db.admin.unsafe(`update ${shadowQ} set j = (j::jsonb)::json where id = 613`);
      expect(await compareText(SHADOW, TWIN)).toMatchObject({ onlyInA: 1, onlyInB: 1 });
      const v0 = await verify(db.sql, SOURCE);
      expect(v0).toMatchObject({ equal: false, different: 1, missing: 0, extra: 0 });
      expect(v0.differences[0]!.key[0]).toBe("613");
      await db.admin.unsafe(`update ${shadowQ} s set j = w.j from ${TWIN_Q} w where w.id = s.id and s.id = 613`);
      await db.admin.unsafe(`update ${shadowQ} set "Mixed Case col" = null where id = 613`);
      expect(await compareText(SHADOW, TWIN)).toMatchObject({ onlyInA: 1, onlyInB: 1 });
      await db.admin.unsafe(
        `update ${shadowQ} s set "Mixed Case col" = w."Mixed Case col" from ${TWIN_Q} w where w.id =
          s.id and s.id = 613`,
      );
      expect(await compareText(SHADOW, TWIN)).toMatchObject({ onlyInA: 0, onlyInB: 0 });

      const v = await verify(db.sql, SOURCE);
      expect(v.differences).toEqual([]);
      expect(v.equal).toBe(true);
      expect(v.rowsCompared).toBe(srcTwin.rowsB);
    },
  );
});

/**
 * A small logical-mode migration of `name` (id, created_at, then `columns`), backfilled; `rows` (values of
 * `columns`, as text) are inserted after the backfill and the stream applied.
 * @returns rows that differ between the source and the shadow (native equality of every column).
 */
async function streamRows(name: string, columns: string, rows: (string | null)[][]): Promise<number> {
  const table = { schema: "public", name };
  await db.admin.unsafe(
    `create table ${quoteIdent(name)} (id bigint primary key, created_at timestamptz not null default
      '2025-03-01 12:00+00', ${columns})`,
  );
  await startMigration(db.sql, table, {
    allowKeyExtension: true,
    spec: parsePartitionSpec("range:created_at:month"),
    mode: "logical",
    now: new Date("2025-03-15T00:00:00Z"),
  });
  await backfill(db.sql, table, {});
  const names = (
    await db.admin`select attname::text as a from pg_attribute where attrelid = to_regclass(${quoteIdent(name)}) and
      attnum > 2 order by attnum`
  ).map((r) => String(r.a));
  let id = 0;
  for (const row of rows) {
    await writer.unsafe(
      `insert into ${quoteIdent(name)} (id, ${names.map(quoteIdent).join(", ")}) values ($1,
        ${names.map((_, i) => `$${i + 2}`).join(", ")})`,
      [String(++id), ...row],
    );
  }
  await applyStream(table);
  const m = (await loadMigration(db.sql, table))!;
  const r = await db.admin.unsafe(`
    select (select count(*) from (select * from ${quoteQualified(m.original)} except all select * from
      ${quoteQualified(m.partitioned)}) x)::int
         + (select count(*) from (select * from ${quoteQualified(m.partitioned)} except all select * from
           ${quoteQualified(m.original)}) y)::int as n`);
  return Number(r[0]!.n);
}

describe("logical apply: names with dots, database-level output settings", () => {
  // postgres.js's sql(name) splits a name on dots: "dot.col" would become "dot"."col" (syntax error), a type in
  // schema "enum.schema" "enum"."schema"."mood" (cross-database reference). The applier quotes with db.ts ident().
  it("a column whose name has a dot", async () => {
    expect(await streamRows("dotted_col", `"dot.col" text`, [["x"]])).toBe(0);
  });

  it("a column whose type is in a schema whose name has a dot", async () => {
    await db.admin.unsafe(`create schema "enum.schema"; create type "enum.schema".mood as enum ('a', 'b')`);
    expect(await streamRows("dotted_type", `e "enum.schema".mood`, [["a"]])).toBe(0);
  });

  // The walsender formats values with its session's settings, which default to the database's (or the role's):
  // with extra_float_digits = 0 set on the database, floats would lose digits silently (0.30000000000000004
  // arriving as 0.3). The applier pins the walsender's output settings (db.ts SESSION_FORMATS).
  it("ALTER DATABASE ... SET extra_float_digits = 0", async () => {
    const name = new URL(db.url).pathname.slice(1);
    await db.admin.unsafe(`alter database ${quoteIdent(name)} set extra_float_digits = 0`);
    try {
      expect(await streamRows("float_digits", "f8 float8, f4 real", [["0.30000000000000004", "3.4028235e+38"]])).toBe(
        0,
      );
    } finally {
      await db.admin.unsafe(`alter database ${quoteIdent(name)} reset extra_float_digits`);
    }
  });

  // With a non-ISO DateStyle on the database the walsender would send "01/03/2025 12:00:00 UTC", which the
  // applier's session (DateStyle ISO, YMD) refuses: "date/time field value out of range".
  it("ALTER DATABASE ... SET DateStyle = 'SQL, DMY'", async () => {
    const name = new URL(db.url).pathname.slice(1);
    await db.admin.unsafe(`alter database ${quoteIdent(name)} set DateStyle = 'SQL, DMY'`);
    try {
      expect(await streamRows("date_style", "d date", [["2025-04-03"]])).toBe(0);
    } finally {
      await db.admin.unsafe(`alter database ${quoteIdent(name)} reset DateStyle`);
    }
  });
});

describe("logical apply: group commits", () => {
  it("a lone write is applied and committed with nobody waiting for it (the timed group commit)", async () => {
    const table = { schema: "public", name: "lone_write" };
    await db.admin.unsafe(
      `create table lone_write (id bigint primary key, created_at timestamptz not null default
        '2025-03-01 12:00+00', v text)`,
    );
    await startMigration(db.sql, table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
      mode: "logical",
      now: new Date("2025-03-15T00:00:00Z"),
    });
    await backfill(db.sql, table, {});
    const m = (await loadMigration(db.sql, table))!;
    const commits: ApplierProgress[] = [];
    const applier = new Applier(requireStream(m), { url: db.url, onCommit: (p) => commits.push(p) });
    await applier.start();
    try {
      await db.admin`insert into lone_write (id, v) values (1, 'one')`;
      // No waitFor (which commits at once): only the 50 ms timer can commit the group holding this insert.
      const t0 = Date.now();
      let seen = 0;
      while (Date.now() - t0 < 5000) {
        seen = Number(
          (
            await db.admin.unsafe(
              `select count(*)::int as n from ${quoteQualified(m.partitioned)} where id = 1 and v = 'one'`,
            )
          )[0]!.n,
        );
        if (seen === 1) break;
        await sleep(20);
      }
      expect(seen).toBe(1);
      expect(Date.now() - t0).toBeLessThan(3000); // the 50 ms timer plus the WAL writer (wal_writer_delay)
      for (let i = 0; i < 50 && commits.length === 0; i++) await sleep(20); // onCommit follows the COMMIT
      expect(commits.length).toBeGreaterThanOrEqual(1);
      expect(applier.error).toBeNull();
      // The migration row records the applied position with the shadow's commit.
      const row = (await loadMigration(db.sql, table))!;
      expect(row.applied_lsn).toBe(commits.at(-1)!.appliedLsn);
    } finally {
      await applier.stop();
    }
  });
});
