/**
 * Mirror cost per row: the CPU time one server backend spends per single-row statement with no mirror, with the
 * floor (the row written a second time by the statement itself) and with the trigger mirror's function in
 * several variants, on the shape of scripts/bench-overhead. Wall-clock TPS on a shared machine moves by tenths
 * between repeats; the CPU time of the one backend doing the work does not depend on what else runs (much).
 *
 *   scripts/bench-mirror-row [--rows N] [--statements N] [--repeat K] [--variants a,b,...] [--json]
 *
 * One process, one run:
 *  1. starts the embedded PostgreSQL (unless DATABASE_URL is set: it must be a server on this machine, whose
 *     backend's CPU time can be read from /proc; the bench tables are dropped at the end);
 *  2. builds three copies of the workload table (createWorkload: bigint primary key `id`, `created_at` not in
 *     it, default 200,000 rows): `bench_row_a` for (a), `bench_row_d` and its plain copy `bench_row_d_copy`
 *     for (d), `bench_row_m` migrated with pgshift (startMigration, mode trigger, range:created_at:month: 28
 *     partitions and a DEFAULT, the shadow's key widened to (id, created_at); backfill completed);
 *  3. each round (--repeat, default 7) runs statements of the same kinds and counts (values drawn afresh for each
 *     setup: drawn twice, the same values would move rows to where they already are) in every setup,
 *     in an order rotated by one each round, on one connection whose backend's CPU time is read from /proc
 *     (schedstat, ns; utime + stime of /proc/<pid>/stat when schedstat is missing) before and after each kind:
 *       --statements (default 10,000) one-statement transactions, sent pipelined: 25 % INSERT (explicit id,
 *       created_at = now()), 40 % UPDATE of status and amount, 10 % UPDATE that moves created_at to another
 *       month (another partition of the shadow), 25 % DELETE, of random existing rows; by kind, in that order,
 *       after 400 statements of warm-up (all kinds, not counted). Before each setup's statements: VACUUM of its
 *       tables, CHECKPOINT (no dirty buffer of another setup left for this one to write out), its tables and
 *       their indexes and TOAST read into shared buffers (pg_prewarm; skipped when the extension is missing);
 *       after a mirror's: the shadow compared with the table (EXCEPT both ways), which must be equal.
 *     The setups:
 *       (a)  no mirror;
 *       (d)  floor: every statement also writes its row to a plain copy (same columns and indexes, not
 *            partitioned) in the same statement, with a data-modifying WITH (floor (d) of bench-overhead);
 *       current: pgshift's trigger mirror as committed (the function mirrorFunctionSql renders for the
 *            migration, installed by start);
 *       and the variants this script renders itself, only to compare them (installed with CREATE OR REPLACE in
 *       place of the migration's function, the trigger unchanged; not pgshift's code):
 *       update-first: an UPDATE that keeps the key runs UPDATE ... WHERE key, and the upsert only when no row
 *            was found;
 *       no-set: current without its SET clauses (search_path, plan_cache_mode), the session running with
 *            plan_cache_mode = force_generic_plan meanwhile (same plans): what saving and restoring the two
 *            settings costs per call (UNSAFE as a mirror: the search_path is the caller's);
 *       invoker: current without SECURITY DEFINER and its SET clauses (same session setting): the cost of the
 *            whole security-definer call path (UNSAFE as a mirror).
 *  4. prints, per setup, the medians over the rounds of the CPU per statement (µs) by kind and for the mix, the
 *     WAL bytes per statement, the extra CPU over (a), and that extra against the floor's: (setup - a) / (d - a).
 */
import { readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { parseArgs } from "node:util";
import postgres from "postgres";
import { connectionUrl } from "../src/db.js";
import {
  abort,
  backfill,
  loadMigration,
  type Migration,
  parsePartitionSpec,
  type QualifiedName,
  quoteIdent,
  quoteQualified,
  type Sql,
  startMigration,
  triggerMirror,
} from "../src/index.js";
import { createWorkload } from "../src/load/workload.js";
import { columnList } from "../src/sql/statement.js";
import {
  COMMON_OPTIONS,
  fmtInt,
  median,
  openBenchSession,
  positiveInt,
  printedHelp,
  runBench,
} from "./bench-common.js";

const SPEC = "range:created_at:month";
const at = (name: string): QualifiedName => ({ schema: "public", name });
const TABLES = {
  a: at("bench_row_a"),
  d: at("bench_row_d"),
  copy: at("bench_row_d_copy"),
  m: at("bench_row_m"),
  twin: at("bench_row_twin"),
};
const KINDS = ["insert", "update", "move", "delete"] as const;
type Kind = (typeof KINDS)[number];
/** Share of each kind in the statements (bench-overhead's mix: one UPDATE in five moves the row). */
const SHARE: Record<Kind, number> = { insert: 0.25, update: 0.4, move: 0.1, delete: 0.25 };
const WARMUP = 400;

/** A mirror variant: how its function is made from the migration and the committed function's text. */
interface Variant {
  label: string;
  /** Run the session with plan_cache_mode = force_generic_plan (the function lacks its SET clause). */
  sessionGeneric: boolean;
  render: (m: Migration, current: string) => string;
}

const SET_CLAUSES =
  /SECURITY DEFINER\s+SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS/;

function withoutSetClauses(current: string, keep: string): string {
  if (!SET_CLAUSES.test(current)) throw new Error("the committed mirror function no longer has the SET clauses");
  return current.replace(SET_CLAUSES, keep);
}

/** The parts of a function body, from the migration as src/mirror/mirror.ts passes them to mirrorFunctionSql. */
function parts(m: Migration) {
  const to = quoteQualified(m.copy);
  const key = m.shadow_key;
  const tuple = (rec: string) => `(${key.map((k) => `${rec}.${quoteIdent(k)}`).join(", ")})`;
  const rest = m.copy_columns.filter((c) => !key.includes(c)).map(quoteIdent);
  const header =
    `CREATE OR REPLACE FUNCTION ${quoteQualified(m.mirrorFn)}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER\n` +
    "SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS $bench$\n" +
    "#variable_conflict use_column\nBEGIN\n";
  const whereKey = (rec: string) => `(${columnList(key)}) = ${tuple(rec)}`;
  const upsert =
    `  INSERT INTO ${to} (${columnList(m.copy_columns)})\n` +
    `    VALUES (${m.copy_columns.map((c) => `NEW.${quoteIdent(c)}`).join(", ")})\n` +
    `    ON CONFLICT (${columnList(key)}) DO UPDATE SET ${rest.map((c) => `${c} = EXCLUDED.${c}`).join(", ")};\n`;
  const deletes = [
    "  IF TG_OP = 'DELETE' THEN",
    `    DELETE FROM ${to} WHERE ${whereKey("OLD")};`,
    "    RETURN NULL;",
    "  END IF;",
    "",
  ].join("\n");
  return { to, tuple, rest, header, whereKey, upsert, deletes, footer: "  RETURN NULL;\nEND\n$bench$" };
}

const VARIANTS: Record<string, Variant> = {
  current: { label: "current (committed)", sessionGeneric: false, render: (_m, c) => c },
  "update-first": {
    label: "update-first (bench-only)",
    sessionGeneric: false,
    render: (m) => {
      const p = parts(m);
      return (
        p.header +
        p.deletes +
        "  IF TG_OP = 'UPDATE' THEN\n" +
        `    IF ${p.tuple("OLD")} IS DISTINCT FROM ${p.tuple("NEW")} THEN\n` +
        `      DELETE FROM ${p.to} WHERE ${p.whereKey("OLD")};\n    ELSE\n` +
        `      UPDATE ${p.to} SET ${p.rest.map((c) => `${c} = NEW.${c}`).join(", ")} WHERE ${p.whereKey("NEW")};\n` +
        "      IF FOUND THEN\n        RETURN NULL;\n      END IF;\n    END IF;\n  END IF;\n" +
        p.upsert +
        p.footer
      );
    },
  },
  "no-set": {
    label: "no-set (bench-only, unsafe)",
    sessionGeneric: true,
    render: (_m, c) => withoutSetClauses(c, "SECURITY DEFINER AS"),
  },
  invoker: {
    label: "invoker (bench-only, unsafe)",
    sessionGeneric: true,
    render: (_m, c) => withoutSetClauses(c, "AS"),
  },
};
const DEFAULT_VARIANTS = ["current", "update-first", "no-set", "invoker"];

function usage(): string {
  return `usage: scripts/bench-mirror-row [--rows N] [--statements N] [--repeat K] [--variants LIST] [--json]
  --rows N          rows in each table (default 200000)
  --statements N    measured statements per setup and round (default 10000)
  --repeat K        rounds (default 7); medians are reported
  --variants LIST   mirror variants, comma-separated (default ${DEFAULT_VARIANTS.join(",")}; (a) and (d) always run)
  --json            print the report as JSON on stdout
Uses DATABASE_URL when set (a server on this machine), else starts an embedded PostgreSQL.`;
}

// ---------------------------------------------------------------------------------------------------------
// CPU time of one local backend.

/** CPU time of process `pid` in ns: /proc/<pid>/schedstat (ns), else utime + stime of /proc/<pid>/stat (10 ms). */
function cpuNs(pid: number): { ns: number; source: "schedstat" | "stat" } {
  try {
    return { ns: Number(readFileSync(`/proc/${pid}/schedstat`, "utf8").split(" ")[0]), source: "schedstat" };
  } catch {
    const s = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
    // utime, stime: fields 14 and 15 (1-based), in USER_HZ ticks (100 a second on Linux)
    return { ns: (Number(f[11]) + Number(f[12])) * 1e7, source: "stat" };
  }
}

// ---------------------------------------------------------------------------------------------------------
// The statements.

/** mulberry32: the same sequence for every setup of a round. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface Op {
  kind: Kind;
  id: number;
  /** insert: amount; update: status, amount; move: created_at (ISO) */
  a?: string;
  b?: string;
}

/** A table's live keys and the next id to insert, as the statements change them. */
interface Keys {
  ids: number[];
  next: number;
}

const STATUSES = ["new", "paid", "shipped"];
const DAY = 86_400_000;

/** `n` statements of `kind` drawn from `rand` against `keys` (changed as they would be). */
function drawOps(kind: Kind, n: number, rand: () => number, keys: Keys): Op[] {
  const ops: Op[] = [];
  for (let i = 0; i < n; i++) {
    if (kind === "insert") {
      const id = keys.next++;
      keys.ids.push(id);
      ops.push({ kind, id, a: (rand() * 1000).toFixed(2) });
      continue;
    }
    const idx = Math.floor(rand() * keys.ids.length);
    const id = keys.ids[idx]!;
    if (kind === "update") ops.push({ kind, id, a: STATUSES[Math.floor(rand() * 3)]!, b: (rand() * 1000).toFixed(2) });
    else if (kind === "move")
      ops.push({ kind, id, a: new Date(Date.now() - Math.floor(rand() * 700 * DAY)).toISOString() });
    else {
      keys.ids[idx] = keys.ids[keys.ids.length - 1]!;
      keys.ids.pop();
      ops.push({ kind, id });
    }
  }
  return ops;
}

/** Sends one statement of `op` to `t` (with `copy`: also to the copy, in the same statement: floor (d)). */
function send(w: postgres.Sql, t: QualifiedName, copy: QualifiedName | null, op: Op) {
  const tbl = w`${w(t.schema)}.${w(t.name)}`;
  if (copy === null) {
    switch (op.kind) {
      case "insert":
        return w`insert into ${tbl} (id, region, status, amount, note, data)
                 values (${op.id}, 'emea', 'new', ${op.a!}, 'w', '{"w": 1}')`;
      case "update":
        return w`update ${tbl} set status = ${op.a!}, amount = ${op.b!} where id = ${op.id}`;
      case "move":
        return w`update ${tbl} set created_at = ${op.a!}, status = 'moved' where id = ${op.id}`;
      case "delete":
        return w`delete from ${tbl} where id = ${op.id}`;
    }
  }
  const c = w`${w(copy.schema)}.${w(copy.name)}`;
  switch (op.kind) {
    case "insert":
      return w`with i as (insert into ${tbl} (id, region, status, amount, note, data)
                 values (${op.id}, 'emea', 'new', ${op.a!}, 'w', '{"w": 1}')
                 returning id, created_at, region, status, amount, note, data)
               insert into ${c} (id, created_at, region, status, amount, note, data) select * from i`;
    case "update":
      return w`with u as (update ${tbl} set status = ${op.a!}, amount = ${op.b!} where id = ${op.id}
                 returning id, status, amount)
               update ${c} f set status = u.status, amount = u.amount from u where f.id = u.id`;
    case "move":
      return w`with u as (update ${tbl} set created_at = ${op.a!}, status = 'moved' where id = ${op.id}
                 returning id, created_at, status)
               update ${c} f set created_at = u.created_at, status = u.status from u where f.id = u.id`;
    case "delete":
      return w`with d as (delete from ${tbl} where id = ${op.id} returning id)
               delete from ${c} f using d where f.id = d.id`;
  }
}

/** Runs `ops` on the load connection, pipelined (up to 256 statements in flight), each its own transaction. */
async function runOps(w: postgres.Sql, t: QualifiedName, copy: QualifiedName | null, ops: Op[]): Promise<void> {
  for (let i = 0; i < ops.length; i += 256) await Promise.all(ops.slice(i, i + 256).map((op) => send(w, t, copy, op)));
}

// ---------------------------------------------------------------------------------------------------------
// Setups and rounds.

type SetupName = "a" | "d" | string;

interface Measured {
  setup: SetupName;
  round: number;
  /** CPU per statement of each kind and of the whole mix, µs. */
  cpuUs: Record<Kind | "mix", number>;
  /** WAL per statement of the mix, bytes. */
  walBytes: number;
}

const SETUP_LABELS: Record<string, string> = {
  a: "(a) no mirror",
  d: "(d) floor: written twice by the statement",
};
const labelOf = (s: SetupName) => SETUP_LABELS[s] ?? VARIANTS[s]!.label;

async function walLsn(sql: Sql): Promise<string> {
  return String((await sql`select pg_current_wal_lsn()::text as l`)[0]!.l);
}

async function walSince(sql: Sql, from: string): Promise<number> {
  return Number((await sql`select pg_wal_lsn_diff(pg_current_wal_lsn(), ${from}::pg_lsn)::float8 as b`)[0]!.b);
}

/** Rows of `a` missing from `b` and of `b` missing from `a`, over `columns`. */
async function differences(sql: Sql, a: QualifiedName, b: QualifiedName, columns: string[]): Promise<number> {
  const cols = columnList(columns);
  const q = (x: QualifiedName, y: QualifiedName) =>
    `select count(*)::int as n from (select ${cols} from ${quoteQualified(x)} except all select ${cols} from ` +
    `${quoteQualified(y)}) d`;
  const r = await sql.unsafe(`select (${q(a, b)}) + (${q(b, a)}) as n`);
  return Number(r[0]!.n);
}

/** Reads `roots` (and their partitions, indexes and TOAST) into shared buffers; false without pg_prewarm. */
async function prewarm(sql: Sql, roots: QualifiedName[]): Promise<void> {
  await sql.unsafe(
    `with tree as (select relid from unnest($1::regclass[]) r, pg_partition_tree(r)),
          rels as (select relid as oid from tree
                   union select c.reltoastrelid from pg_class c join tree t on c.oid = t.relid
                   union select i.indexrelid from pg_index i join tree t on i.indrelid = t.relid
                   union select i.indexrelid from pg_class c join tree t on c.oid = t.relid
                                              join pg_index i on i.indrelid = c.reltoastrelid)
     select sum(pg_prewarm(r.oid)) from rels r join pg_class c on c.oid = r.oid where c.relkind in ('r', 'i', 't')`,
    [roots.map(quoteQualified)],
  );
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      rows: COMMON_OPTIONS.rows,
      repeat: COMMON_OPTIONS.repeat,
      json: COMMON_OPTIONS.json,
      help: COMMON_OPTIONS.help,
      statements: { type: "string" },
      variants: { type: "string" },
    },
    strict: true,
    allowPositionals: false,
  });
  if (printedHelp(values, usage)) return 0;
  const rows = positiveInt("--rows", values.rows, 200_000);
  const statements = positiveInt("--statements", values.statements, 10_000);
  const repeat = positiveInt("--repeat", values.repeat, 7);
  const variants = values.variants === undefined ? DEFAULT_VARIANTS : values.variants.split(",").map((v) => v.trim());
  for (const v of variants)
    if (!VARIANTS[v]) throw new Error(`--variants: unknown variant ${v} (known: ${Object.keys(VARIANTS).join(", ")})`);
  const json = values.json === true;
  const say = (l: string) => process.stderr.write(`${l}\n`);
  const counts = Object.fromEntries(KINDS.map((k) => [k, Math.max(1, Math.round(statements * SHARE[k]))])) as Record<
    Kind,
    number
  >;

  const dropBench = async (s: Sql) => {
    if (await loadMigration(s, TABLES.m).catch(() => null)) await abort(s, TABLES.m);
    for (const t of [TABLES.a, TABLES.d, TABLES.copy, TABLES.m, TABLES.twin])
      await s.unsafe(`drop table if exists ${quoteQualified(t)}`);
  };
  const { sql, external, cleanup } = await openBenchSession({
    applicationName: "bench-mirror-row",
    say,
    dropTables: dropBench,
  });
  let load: postgres.Sql | null = null;
  try {
    const url = connectionUrl(sql);
    const version = String((await sql`select current_setting('server_version') as v`)[0]!.v);
    const serverInfo = `PostgreSQL ${version}${external ? "" : " (embedded)"}`;
    say(serverInfo);
    await dropBench(sql);
    for (const t of [TABLES.a, TABLES.d, TABLES.m]) {
      say(`creating ${t.name} with ${fmtInt(rows)} rows ...`);
      await createWorkload(sql, { table: t, twin: TABLES.twin, keyKind: "bigint" }, rows);
      await sql.unsafe(`drop table ${quoteQualified(TABLES.twin)}`);
      await sql.unsafe(`alter table ${quoteQualified(t)} set (autovacuum_enabled = off)`);
    }
    await sql.unsafe(
      `create table ${quoteQualified(TABLES.copy)} (like ${quoteQualified(TABLES.d)} including all) ` +
        "with (autovacuum_enabled = off)",
    );
    await sql.unsafe(
      `insert into ${quoteQualified(TABLES.copy)} (id, created_at, region, status, amount, note, data) ` +
        `select id, created_at, region, status, amount, note, data from ${quoteQualified(TABLES.d)}`,
    );
    say(`migrating ${TABLES.m.name} (${SPEC}, trigger mirror) and backfilling ...`);
    await startMigration(sql, TABLES.m, { allowKeyExtension: true, spec: parsePartitionSpec(SPEC), mode: "trigger" });
    if (!(await backfill(sql, TABLES.m, {})).complete) throw new Error("backfill did not complete");
    const m = (await loadMigration(sql, TABLES.m))!;
    const current = triggerMirror.startSql(m)[0]!;
    const partitions = Number(
      (
        await sql`select count(*)::int as n from pg_partition_tree(${quoteQualified(m.copy)}::regclass)
                   where isleaf`
      )[0]!.n,
    );
    for (const t of [TABLES.a, TABLES.d, TABLES.copy, TABLES.m]) await sql.unsafe(`analyze ${quoteQualified(t)}`);
    await sql.unsafe(`analyze ${quoteQualified(m.copy)}`);

    const ids = (await sql`select id::int8::text as id from ${sql(TABLES.a.schema)}.${sql(TABLES.a.name)}`).map((r) =>
      Number(r.id),
    );
    const firstNew = ids.reduce((x, y) => Math.max(x, y), 0) + 1;
    const keys: Record<"a" | "d" | "m", Keys> = {
      a: { ids: [...ids], next: firstNew },
      d: { ids: [...ids], next: firstNew },
      m: { ids: [...ids], next: firstNew },
    };
    load = postgres(url, {
      max: 1,
      onnotice: () => {},
      idle_timeout: 0,
      connection: { application_name: "bench-row" },
    });
    const pid = Number((await load`select pg_backend_pid() as pid`)[0]!.pid);
    const cpuSource = cpuNs(pid).source;
    if (!readFileSync(`/proc/${pid}/cmdline`, "utf8").startsWith("postgres"))
      throw new Error("the server's backend is not a process of this machine: its CPU time cannot be read");

    const warmable = await sql
      .unsafe("create extension if not exists pg_prewarm")
      .then(() => true)
      .catch(() => false);
    if (!warmable) say("pg_prewarm is not available: the tables are not read into shared buffers before each run");
    const sizes = await sql.unsafe(
      `select sum(pg_total_relation_size(relid))::float8 / 1048576 as mb
         from unnest($1::regclass[]) r, pg_partition_tree(r)`,
      [[TABLES.a, TABLES.d, TABLES.copy, TABLES.m, m.copy].map(quoteQualified)],
    );
    say(`all tables: ${Math.round(Number(sizes[0]!.mb))} MB`);
    const setups: SetupName[] = ["a", "d", ...variants];
    const results: Measured[] = [];
    let installed = "current";
    for (let round = 1; round <= repeat; round++) {
      const order = setups.map((_, i) => setups[(i + round - 1) % setups.length]!);
      for (const setup of order) {
        const which = setup === "a" ? "a" : setup === "d" ? "d" : "m";
        const table = which === "a" ? TABLES.a : which === "d" ? TABLES.d : TABLES.m;
        const copy = which === "d" ? TABLES.copy : null;
        const variant = VARIANTS[setup];
        if (variant && installed !== setup) {
          await sql.unsafe(variant.render(m, current));
          installed = setup;
        }
        await sql.unsafe(`vacuum ${quoteQualified(table)}`);
        if (copy) await sql.unsafe(`vacuum ${quoteQualified(copy)}`);
        if (which === "m") await sql.unsafe(`vacuum ${quoteQualified(m.copy)}`);
        await sql`checkpoint`;
        if (warmable) await prewarm(sql, which === "m" ? [table, m.copy] : copy ? [table, copy] : [table]);
        if (variant?.sessionGeneric) await load`set plan_cache_mode = force_generic_plan`;
        // Values drawn afresh for each setup (the same sequence twice would move rows to where they already are)
        const seed = round * 1000 + setups.indexOf(setup);
        const warm = prng(seed * 7919);
        const warmOps = KINDS.flatMap((k) => drawOps(k, WARMUP * SHARE[k], warm, keys[which]));
        await runOps(load, table, copy, warmOps);
        const rand = prng(seed);
        const cpuUs = {} as Record<Kind | "mix", number>;
        const lsn = await walLsn(sql);
        let total = 0;
        for (const kind of KINDS) {
          const ops = drawOps(kind, counts[kind], rand, keys[which]);
          const c0 = cpuNs(pid).ns;
          await runOps(load, table, copy, ops);
          const ns = cpuNs(pid).ns - c0;
          total += ns;
          cpuUs[kind] = ns / 1000 / ops.length;
        }
        const n = KINDS.reduce((s, k) => s + counts[k], 0);
        cpuUs.mix = total / 1000 / n;
        const walBytes = (await walSince(sql, lsn)) / n;
        if (variant?.sessionGeneric) await load`reset plan_cache_mode`;
        if (which === "m") {
          const diff = await differences(sql, TABLES.m, m.copy, m.copy_columns);
          if (diff !== 0) throw new Error(`${setup}: the shadow differs from the table in ${diff} rows`);
        }
        results.push({ setup, round, cpuUs, walBytes });
        say(
          `[${round}] ${labelOf(setup).padEnd(44)} ${cpuUs.mix.toFixed(1).padStart(6)} µs/statement ` +
            `(${KINDS.map((k) => `${k} ${cpuUs[k].toFixed(1)}`).join(", ")}), WAL ${fmtInt(walBytes)} B/statement`,
        );
      }
    }
    if (installed !== "current") await sql.unsafe(current);

    const med = (s: SetupName, f: (r: Measured) => number) => median(results.filter((r) => r.setup === s).map(f));
    const r1 = (x: number) => Number(x.toFixed(1));
    const a = (f: (r: Measured) => number) => med("a", f);
    const floorExtra = med("d", (r) => r.cpuUs.mix) - a((r) => r.cpuUs.mix);
    const perRound = (s: SetupName) =>
      Array.from({ length: repeat }, (_, i) => {
        const get = (x: SetupName) => results.find((r) => r.setup === x && r.round === i + 1)!.cpuUs.mix;
        return Number(((get(s) - get("a")) / (get("d") - get("a"))).toFixed(2));
      });
    const table = setups.map((s) => {
      const cpu = Object.fromEntries([...KINDS, "mix"].map((k) => [k, r1(med(s, (r) => r.cpuUs[k as Kind]))]));
      const extra = med(s, (r) => r.cpuUs.mix) - a((r) => r.cpuUs.mix);
      return {
        setup: s,
        label: labelOf(s),
        cpuUs: cpu as Record<Kind | "mix", number>,
        walBytes: Math.round(med(s, (r) => r.walBytes)),
        extraUs: s === "a" ? null : r1(extra),
        extraOverFloor: s === "a" ? null : Number((extra / floorExtra).toFixed(2)),
        extraOverFloorPerRound: s === "a" ? null : perRound(s),
      };
    });
    const report = {
      server: serverInfo,
      cpus: availableParallelism(),
      rows,
      statements: { ...counts, warmup: WARMUP },
      repeat,
      shadowPartitions: partitions,
      cpuSource,
      setups: table,
      rounds: results,
    };
    if (json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
    else {
      const out = [
        "",
        `pgshift mirror cost per row: ${serverInfo}, ${report.cpus} CPUs, ${fmtInt(rows)} rows, shadow of ` +
          `${partitions} partitions; CPU of the one backend (${cpuSource}), medians of ${repeat} rounds of ` +
          `${fmtInt(KINDS.reduce((s, k) => s + counts[k], 0))} statements`,
        "",
        "| setup | mix µs/stmt | INSERT | UPDATE | UPDATE moving | DELETE | WAL B/stmt | extra over (a) µs | " +
          "extra / floor's extra (per round) |",
        "|---|---|---|---|---|---|---|---|---|",
      ];
      for (const r of table)
        out.push(
          `| ${r.label} | ${r.cpuUs.mix} | ${r.cpuUs.insert} | ${r.cpuUs.update} | ${r.cpuUs.move} | ` +
            `${r.cpuUs.delete} | ${fmtInt(r.walBytes)} | ${r.extraUs ?? ""} | ` +
            `${r.extraOverFloor === null ? "" : `${r.extraOverFloor} (${r.extraOverFloorPerRound!.join(", ")})`} |`,
        );
      process.stdout.write(`${out.join("\n")}\n`);
    }
    return 0;
  } finally {
    await load?.end({ timeout: 5 }).catch(() => {});
    await cleanup();
  }
}

runBench("bench-mirror-row", usage, main);
