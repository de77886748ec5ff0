import { z } from "zod";
import { type AnySql, type Sql, transaction, withLockRetry } from "../db.js";
import { isConnectionLoss, PgshiftError, PhaseError, sqlState } from "../errors.js";
import { log } from "../log.js";
// mirror.ts imports this module's types only; triggerMirror is used inside a function (no cycle at load).
import { triggerMirror } from "../mirror/mirror.js";
import { truncateGuardSql } from "../mirror/trigger.js";
import { displayName, type QualifiedName, quoteQualified } from "../names.js";
import { PartitionSpecSchema } from "../partitioning/spec.js";
import { loadSql } from "../sql/template.js";
import { upgradeDdlGuard } from "./ddl-guard.js";
import { type Command, NEXT_STEP, namesInSql, PHASES, STREAMING_PHASES, TRANSITIONS, tablesIn } from "./phases.js";

export type { Command, Phase } from "./phases.js";

export const MODES = ["trigger", "logical"] as const;
export type Mode = (typeof MODES)[number];

const SequenceUse = z.object({
  column: z.string(),
  schema: z.string(),
  name: z.string(),
  /** '' serial-style default, 'a' / 'd' identity (ALWAYS / BY DEFAULT) on the original table. */
  identity: z.string(),
  /** Identity only: the function the shadow's default calls (pgshift schema). */
  defaultFunction: z.string().nullable(),
});
export type SequenceUse = z.infer<typeof SequenceUse>;

const DeferredIndexSchema = z.object({
  name: z.string(),
  original: z.string(),
  unique: z.boolean(),
  definition: z.string(),
  /** The UNIQUE constraint the index backs (absent in rows written by an older pgshift: a plain index then). */
  constraint: z
    .object({ definition: z.string(), deferrable: z.boolean(), deferred: z.boolean() })
    .nullable()
    .optional(),
});

export const VerifyResultSchema = z.object({
  at: z.string(),
  equal: z.boolean(),
  rowsCompared: z.number(),
  chunks: z.number(),
  chunksDiffering: z.number(),
  missing: z.number(),
  extra: z.number(),
  different: z.number(),
  repaired: z.number(),
  ms: z.number(),
});
export type VerifyResult = z.infer<typeof VerifyResultSchema>;

/** One row of pgshift.migrations, validated when read back. */
export const MigrationRowSchema = z.object({
  id: z.coerce.number(),
  source_schema: z.string(),
  source_table: z.string(),
  shadow_table: z.string(),
  retired_table: z.string(),
  spec: PartitionSpecSchema,
  mode: z.enum(MODES),
  phase: z.enum(PHASES),
  key_columns: z.array(z.string()).min(1),
  shadow_key: z.array(z.string()).min(1),
  copy_columns: z.array(z.string()).min(1),
  sequences: z.array(SequenceUse),
  mirror_function: z.string(),
  deferred_indexes: z.array(DeferredIndexSchema),
  /** Logical mode: the replication slot and publication (null in trigger mode, and once dropped). */
  slot_name: z.string().nullable(),
  publication_name: z.string().nullable(),
  /** Logical mode: end LSN of the last transaction applied to the shadow, and its commit time. */
  applied_lsn: z.string().nullable(),
  applied_commit_time: z.date().nullable(),
  /**
   * WAL insert position read after the backfill's copy finished (text LSN): every row the copy wrote was
   * committed before it. Null until the copy is done; set once (the copy never runs again). Once the stream
   * has applied past it, the shadow equals the table as of the stream's position (Applier exact mode). Any
   * new way of copying rows into the shadow ahead of the stream must clear it first, or wait for the stream
   * as verify's repair does.
   */
  // Missing from a version-1 row (read by plan or status, which do not upgrade).
  copies_lsn: z.string().nullable().default(null),
  index_renames: z.array(z.object({ from: z.string(), to: z.string() })),
  checkpoint: z.array(z.string()).nullable(),
  rows_copied: z.coerce.number(),
  rows_estimated: z.coerce.number(),
  batches: z.coerce.number(),
  last_verify: VerifyResultSchema.nullable(),
  created_at: z.date(),
  backfill_started_at: z.date().nullable(),
  copy_finished_at: z.date().nullable(),
  backfill_finished_at: z.date().nullable(),
  cutover_at: z.date().nullable(),
  swapped_back_at: z.date().nullable(),
  updated_at: z.date(),
  // Version 6 (the pace; missing from an older row, read by plan or status, which do not upgrade):
  /** When pgshift pause paused the copy and the verify (null: not paused), by whom (current_user), from where. */
  paused_at: z.date().nullable().default(null),
  paused_by: z.string().nullable().default(null),
  /** The pausing session's application_name and client address, as one line. */
  paused_client: z.string().nullable().default(null),
  /** What a running backfill or verify waits for now (a throttle's reason), and since when; null when it does not. */
  throttle_reason: z.string().nullable().default(null),
  throttle_since: z.date().nullable().default(null),
  /** The backfill's batch size in use (rows), its target duration (ms; null: fixed size), the last batch's ms. */
  batch_rows: z.coerce.number().nullable().default(null),
  batch_target_ms: z.coerce.number().nullable().default(null),
  last_batch_ms: z.coerce.number().nullable().default(null),
  // Version 8 (missing from an older row, read by plan or status, which do not upgrade):
  /** The migration group (pgshift start --group) the migration belongs to; null: none (docs/groups.md). */
  group_name: z.string().nullable().default(null),
});
export type MigrationRow = z.infer<typeof MigrationRowSchema>;

/**
 * One row of pgshift.backfill_ranges (schema version 9), validated when read back: a key range (lower, upper] of a
 * backfill with parallel workers (null lower: from the first key, null upper: to the last), its checkpoint (the
 * last key copied and clean; null: none yet), rows and batches counted there, and whether it is copied.
 */
export const BackfillRangeRowSchema = z.object({
  range_no: z.coerce.number().int().min(0),
  lower: z.array(z.string()).nullable(),
  upper: z.array(z.string()).nullable(),
  checkpoint: z.array(z.string()).nullable(),
  rows_copied: z.coerce.number(),
  batches: z.coerce.number(),
  done: z.boolean(),
});
export type BackfillRangeRow = z.infer<typeof BackfillRangeRowSchema>;

/**
 * One row of pgshift.partitioned_tables (schema version 7), validated when read back: a table pgshift partitioned
 * and finalized, its spec, and the settings and last run of pgshift maintain (src/maintain/).
 */
export const PartitionedTableRowSchema = z.object({
  table_schema: z.string(),
  table_name: z.string(),
  spec: PartitionSpecSchema,
  /** Partitions kept ahead of now and of the newest row (count). */
  premake: z.coerce.number().int().min(0),
  /** Retention: an interval (time ranges, e.g. `24 months`) or a key distance (integer ranges); null: keep all. */
  retention: z.string().nullable(),
  retention_keep_table: z.boolean(),
  /** `pg_partman` once handed off (then pg_partman's run_maintenance keeps the partitions, not pgshift). */
  hand_off: z.string().nullable(),
  finalized_at: z.date(),
  last_maintained_at: z.date().nullable(),
  last_result: z.unknown().nullable(),
});
export type PartitionedTableRow = z.infer<typeof PartitionedTableRowSchema>;

/** A migration row with its tables named for the current phase (either mode: see Migration). */
export interface MigrationBase extends MigrationRow {
  /** The table the application writes to: always the original name. */
  live: QualifiedName;
  /** The table that receives the mirror: shadow before cutover, retired table after. */
  copy: QualifiedName;
  /** The original (unpartitioned) table under its current name. */
  original: QualifiedName;
  /** The partitioned table under its current name. */
  partitioned: QualifiedName;
  mirrorFn: QualifiedName;
}

/** A trigger-mode migration: row triggers mirror every write; it never has a replication slot or publication. */
export type TriggerMigration = MigrationBase & { mode: "trigger"; slot_name: null; publication_name: null };
/**
 * A logical-mode migration: a replication slot and publication carry the writes to the shadow until the first
 * cutover, which drops them (their names are null from then on, or until a failed drop is retried).
 */
export type LogicalMigration = MigrationBase & { mode: "logical" };
/** A migration, of either mode; `mode` tells which (a trigger-mode one has no slot or publication). */
export type Migration = TriggerMigration | LogicalMigration;
/** A logical-mode migration whose shadow follows its slot now: slot and publication exist, phase before cutover. */
export type StreamingMigration = LogicalMigration & { slot_name: string; publication_name: string };

/** Whether `m` is a logical-mode migration whose slot and publication are named (whatever its phase). */
export function hasStream(m: Migration): m is StreamingMigration {
  return m.mode === "logical" && m.slot_name !== null && m.publication_name !== null;
}

/**
 * `m`, typed as a migration with a stream (to start an Applier on it).
 * @throws PgshiftError when `m` is in trigger mode or its slot or publication is gone.
 */
export function requireStream(m: Migration): StreamingMigration {
  if (hasStream(m)) return m;
  throw new PgshiftError(
    `the migration of ${m.source_schema}.${m.source_table} has no replication stream ` +
      `(${m.mode} mode${m.mode === "logical" ? ", slot dropped at cutover" : ""})`,
  );
}

/**
 * Whether the shadow of `m` follows a replication stream now (logical mode, slot and publication named, a phase
 * of STREAMING_PHASES): then the commands that need every committed change applied wait for the stream.
 */
export function isStreaming(m: Migration): m is StreamingMigration {
  return hasStream(m) && STREAMING_PHASES.includes(m.phase);
}

/**
 * Version of the pgshift schema this code reads and writes (pgshift.schema_version). 1: the first;
 * 2: pgshift.migrations.copies_lsn; 3: the DDL guard's third event trigger (pgshift_partition_guard, on
 * ddl_command_start), which an older guard function must not serve; 4: both tables of a migration carry the
 * TRUNCATE guard, and the DDL guard gives it to new partitions of the shadow too (an older pgshift would
 * put back a guard function that does not); 5: the reverse mirror of a migration in phase cutover inserts and
 * updates without ever overwriting (an older one upserts, and overwrites a row of the retired table when the
 * application reuses its key with another partition value); 6: the pace columns of pgshift.migrations (paused_*,
 * throttle_*, batch_rows, batch_target_ms, last_batch_ms: pgshift pause and resume, the throttle's reason, the
 * batch size in use); 7: pgshift.partitioned_tables (what maintain keeps of each table pgshift partitioned, written at
 * finalize); 8: pgshift.migrations.group_name (migration groups); 9: pgshift.backfill_ranges (the key ranges of a
 * backfill with parallel workers, each with its checkpoint). Each version's change is a numbered file,
 * src/sql/schema/00000N.sql (schemaFile). A database at an older version is upgraded by the first
 * command that writes state (requireSchemaVersion; plan, status and dry runs read it as it is); one at a newer
 * version is refused by every command, so that no pgshift acts on state it does not understand.
 */
export const SCHEMA_VERSION = 9;

/**
 * The file that brings the pgshift schema from `version - 1` to `version` (src/sql/schema/000001.sql creates
 * version 1), in graphile-worker's way: numbered files, each idempotent, each ending by raising
 * pgshift.schema_version to its number. Several statements in one text, run as one query (postgres.js sends a
 * query without parameters in the simple protocol: one implicit transaction when not inside one already).
 */
function schemaFile(version: number): string {
  // Without its last semicolon, like every statement pgshift prints (plan adds one).
  return loadSql(`schema/${String(version).padStart(6, "0")}.sql`).replace(/;$/, "");
}

/** The files that bring a pgshift schema of version `from` (0: none) to SCHEMA_VERSION, in order. */
export function upgradeSql(from: number): string[] {
  const files: string[] = [];
  for (let v = from + 1; v <= SCHEMA_VERSION; v++) files.push(schemaFile(v));
  return files;
}

/** Statements that create the pgshift schema (idempotent), at SCHEMA_VERSION: every schema file in order. */
export function schemaSql(): string[] {
  return upgradeSql(0);
}

/**
 * Work of an upgrade that the schema's files cannot do, because it depends on each migration in progress or on
 * SQL generated by this pgshift (the DDL guard is filled from phases.ts, a mirror function from a migration's
 * row), or must lock tables one by one under lock_timeout and go on without those it cannot lock.
 * `before` runs ahead of the version's transaction, on `sql` itself (its own transactions); `during` runs in
 * that transaction, after the version's file. `guardDone`: the DDL guard was already replaced in this upgrade.
 */
interface UpgradeWork {
  before?: (sql: AnySql) => Promise<void>;
  during?: (tx: AnySql, ctx: { guardDone: boolean }) => Promise<void>;
}

/** Replaces an installed DDL guard with this pgshift's, once per upgrade (it serves versions 3 and 4 alike). */
async function guardOnce(tx: AnySql, ctx: { guardDone: boolean }): Promise<void> {
  if (ctx.guardDone) return;
  await upgradeDdlGuard(tx);
  ctx.guardDone = true;
}

const UPGRADE_WORK: Readonly<Record<number, UpgradeWork>> = {
  // Version 3: the guard's third event trigger (and its function, which an older one must not serve).
  3: { during: guardOnce },
  // Version 4: the copy of each migration in progress gets the TRUNCATE guard; the DDL guard gives it to new
  // partitions.
  4: { before: guardCopies, during: guardOnce },
  // Version 5: the strict reverse mirror of each migration in phase cutover.
  5: { during: (tx) => strictReverseMirrors(tx) },
};

/**
 * The migration of a row read back, named for its phase, typed by its mode.
 * @throws PgshiftError when a trigger-mode row names a replication slot or publication (a state no pgshift writes).
 */
function withNames(row: MigrationRow): Migration {
  const base: MigrationBase = {
    ...row,
    ...tablesIn(row, row.phase),
    mirrorFn: { schema: "pgshift", name: row.mirror_function },
  };
  if (base.mode === "logical") return base as LogicalMigration;
  if (base.slot_name !== null || base.publication_name !== null) {
    throw new PgshiftError(
      `the migration of ${row.source_schema}.${row.source_table} is in trigger mode but names a replication slot ` +
        `or publication (${base.slot_name ?? "-"}, ${base.publication_name ?? "-"}): pgshift never writes that`,
      { hint: "inspect pgshift.migrations; run pgshift abort (before cutover) or fix the row" },
    );
  }
  return base as TriggerMigration;
}

/**
 * Reads the migration of `table` (by its original name), or null. Validates the row with zod. Checks the
 * schema's version first (requireSchemaVersion): refuses a newer one; upgrades an older one unless
 * `opts.upgrade` is false (plan and status change nothing: they read an older row as it is).
 * @throws PgshiftError when pgshift.migrations is not readable, the schema is newer than this pgshift or
 *   cannot be upgraded by this role, or the row is malformed.
 */
export async function loadMigration(
  sql: AnySql,
  table: QualifiedName,
  opts: { upgrade?: boolean } = {},
): Promise<Migration | null> {
  // One round trip for what used to take four (the schema, the table, its privilege, the version table, and
  // whether the current role may act as the state's owner); each CASE evaluates its function only once the
  // objects it names exist.
  const found = StateFound.parse(
    (
      await sql`
    select s.ok,
           case when s.ok then has_table_privilege('pgshift.migrations', 'SELECT') end as readable,
           case when s.ok then to_regclass('pgshift.schema_version') is not null end as versioned,
           case when s.ok then (select pg_catalog.pg_has_role(c.relowner, 'USAGE') from pg_catalog.pg_class c
                                 where c.oid = to_regclass('pgshift.migrations')) end as member
      from (select case when exists (select from pg_namespace where nspname = 'pgshift')
                        then has_schema_privilege('pgshift', 'USAGE') and to_regclass('pgshift.migrations') is not null
                        else false end as ok) s`
    )[0],
  );
  if (!found.ok) return null;
  if (!found.readable)
    throw new PgshiftError((await stateOwnershipProblem(sql)) ?? "permission denied for table pgshift.migrations");
  const upgraded = await requireSchemaVersion(sql, opts.upgrade ?? true, found.versioned ?? false);
  // The owner changes only with an upgrade: without one, the first query's answer stands.
  if ((opts.upgrade ?? true) && (upgraded || !found.member)) {
    const problem = await stateOwnershipProblem(sql);
    if (problem) throw new PgshiftError(problem);
  }
  const rows =
    await sql`select * from pgshift.migrations where source_schema = ${table.schema} and source_table = ${table.name}`;
  if (rows.length === 0) return null;
  const parsed = MigrationRowSchema.safeParse(rows[0]);
  if (!parsed.success) {
    throw new PgshiftError(
      `the pgshift.migrations row of ${displayName(table)} is malformed: ${parsed.error.issues[0]?.message ?? "?"}`,
      {
        hint: "was it edited by hand? restore it or abort the migration",
      },
    );
  }
  return withNames(parsed.data);
}

const StateOwnerRow = z.object({ owner: z.string(), member: z.boolean(), me: z.string() });

/** What loadMigration's first query finds of pgshift's state (null columns when the schema is missing). */
const StateFound = z.object({
  ok: z.boolean().nullable(),
  readable: z.boolean().nullable(),
  versioned: z.boolean().nullable(),
  member: z.boolean().nullable(),
});

/**
 * Whether the current user may change pgshift's state in this database. pgshift keeps one `pgshift` schema
 * per database; the role that first ran it owns its tables and functions, and replacing a function or
 * writing the state needs that role's privileges ("CREATE FUNCTION": to replace a function one must own it,
 * in the PostgreSQL documentation), so the user must be a member of it (a superuser is a member of every role).
 * @returns null when it may (or there is no pgshift schema yet); otherwise one line naming the owner and
 *   what to do.
 */
export async function stateOwnershipProblem(sql: AnySql): Promise<string | null> {
  const rows = await sql`
    select pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(c.relowner)) as owner, pg_catalog.pg_has_role(c.relowner,
      'USAGE') as member,
           pg_catalog.quote_ident(current_user) as me
      from pg_catalog.pg_class c where c.oid = to_regclass('pgshift.migrations')`;
  if (rows.length === 0) return null;
  const r = StateOwnerRow.parse(rows[0]);
  if (r.member) return null;
  return (
    `pgshift's state in this database (schema pgshift) belongs to role ${r.owner}, and ${r.me} is not a member of ` +
    `it: ` +
    `run pgshift as ${r.owner}, or let ${r.me} act as it (GRANT ${r.owner} TO ${r.me})`
  );
}

const VersionRow = z.object({ version: z.coerce.number().int().nullable() });

/**
 * Checks the version of the pgshift schema (pgshift.schema_version, 1 when the table is missing) against
 * SCHEMA_VERSION: refuses a newer one; upgrades an older one when `upgrade` (logged): for each missing version in
 * order, its work ahead of the transaction (UPGRADE_WORK), then one transaction with its file and the rest.
 * `versioned`: whether pgshift.schema_version exists (read by the caller). Returns whether it upgraded.
 * @throws PgshiftError when the schema is newer than this pgshift, or when an upgrade is needed and the
 *   current role may not make it (it must own pgshift.migrations); nothing is changed then.
 */
async function requireSchemaVersion(sql: AnySql, upgrade: boolean, versioned: boolean): Promise<boolean> {
  const rows = versioned ? await sql`select max(version) as version from pgshift.schema_version` : [{ version: null }];
  const version = VersionRow.parse(rows[0]).version ?? 1;
  if (version === SCHEMA_VERSION) return false;
  if (version > SCHEMA_VERSION) {
    throw new PgshiftError(
      `the pgshift schema of this database is version ${version}, newer than this pgshift understands ` +
        `(${SCHEMA_VERSION})`,
      {
        hint: "run the pgshift release that started the migration, or a newer one",
      },
    );
  }
  if (!upgrade) return false;
  try {
    // A schema of version 1 may have no version table (each step is idempotent).
    await sql`create table if not exists pgshift.schema_version (version int not null)`;
    await sql`insert into pgshift.schema_version select ${version}::int where not exists (select from
      pgshift.schema_version)`;
    // One transaction per version, its file last but for the work that needs one: an upgrade cut short stops at
    // a version, and the next command goes on from there.
    const ctx = { guardDone: false };
    for (let v = version + 1; v <= SCHEMA_VERSION; v++) {
      const work = UPGRADE_WORK[v] ?? {};
      if (work.before) await work.before(sql);
      await inTransaction(sql, async (tx) => {
        await tx.unsafe(schemaFile(v));
        if (work.during) await work.during(tx, ctx);
      });
    }
  } catch (err) {
    if (isConnectionLoss(err)) throw err;
    throw new PgshiftError(
      `the pgshift schema of this database is version ${version} and needs an upgrade to ${SCHEMA_VERSION}, ` +
        `which failed: ${err instanceof Error ? err.message : String(err)}`,
      {
        hint: "run this pgshift once as the role that owns pgshift.migrations (it upgrades the schema), then again",
      },
    );
  }
  log().info({ from: version, to: SCHEMA_VERSION }, "upgraded the pgshift schema");
  return true;
}

/**
 * Runs `fn` in a transaction of its own on a pool (transaction, db.ts); on a reserved connection or in a
 * caller's transaction, on it as it is (the caller's transaction, if any, holds it).
 */
async function inTransaction(sql: AnySql, fn: (tx: AnySql) => Promise<void>): Promise<void> {
  if ("release" in sql || "savepoint" in sql) await fn(sql);
  else await transaction(sql, fn);
}

/**
 * Schema version 4: the copy of each migration in progress (shadow, or retired table after cutover) gets the
 * TRUNCATE guard that start and every cutover now give it. CREATE TRIGGER locks the table (SHARE ROW
 * EXCLUSIVE), so each runs under lock_timeout with retries (withLockRetry); a copy still locked after those
 * is left for the next cutover or swap-back, which adds the guard too (logged). Only on a pool: a caller's
 * transaction (which never reaches an upgrade in practice: every command loads its migration on its pool
 * first) leaves it to those as well.
 */
async function guardCopies(sql: AnySql): Promise<void> {
  if ("release" in sql || "savepoint" in sql) return;
  const rows = await sql`
    select source_schema as schema, ${sql.unsafe(namesInSql().copy)} as name
      from pgshift.migrations`;
  for (const copy of z.array(z.object({ schema: z.string(), name: z.string() })).parse(rows)) {
    try {
      await withLockRetry(
        sql,
        async (tx) => {
          const exists = await tx`select to_regclass(${quoteQualified(copy)}) is not null as ok`;
          if (exists[0]?.ok) for (const stmt of truncateGuardSql(copy)) await tx.unsafe(stmt);
        },
        { retries: 5 },
      );
    } catch (err) {
      // withLockRetry's last 55P03 comes wrapped in a PgshiftError.
      if (sqlState(err instanceof PgshiftError ? err.cause : err) !== "55P03") throw err;
      log().warn(
        { table: displayName(copy) },
        "could not lock the table to give it the TRUNCATE guard; the next cutover or swap-back does",
      );
    }
  }
}

/**
 * Schema version 5: each migration in phase cutover gets the reverse mirror function this pgshift writes
 * (strict writes: see triggerMirror.startSql), so that a migration cut over by an older pgshift stops
 * overwriting rows of the retired table at once rather than at its next swap-back and cutover.
 * CREATE OR REPLACE FUNCTION takes no lock on the tables; the trigger already calls the function by name.
 */
async function strictReverseMirrors(sql: AnySql): Promise<void> {
  const rows = await sql`select * from pgshift.migrations where phase = 'cutover'`;
  for (const row of rows) {
    const m = withNames(MigrationRowSchema.parse(row));
    for (const stmt of triggerMirror.startSql(m))
      if (stmt.startsWith("CREATE OR REPLACE FUNCTION")) await sql.unsafe(stmt);
  }
}

/** Name of the replication slot and of the publication of a logical-mode migration of the table with this OID. */
export function logicalNames(sourceOid: number): { slot: string; publication: string } {
  return { slot: `pgshift_${sourceOid}`, publication: `pgshift_${sourceOid}` };
}

/**
 * Loads the migration of `table` and checks that `command` may run in its phase (TRANSITIONS, phases.ts).
 * `opts.upgrade`: as for loadMigration (false for dry runs, which change nothing).
 * @throws PgshiftError when there is no migration; PhaseError, with the phase's next step as its hint, when the
 *   phase does not allow the command.
 */
export async function requireMigration(
  sql: AnySql,
  table: QualifiedName,
  command: Command,
  opts: { upgrade?: boolean } = {},
): Promise<Migration> {
  const m = await loadMigration(sql, table, opts);
  if (!m) {
    throw new PgshiftError(`no migration of ${displayName(table)} is in progress`, {
      hint: `start one with: pgshift start ${displayName(table)} --partition-by <spec>`,
    });
  }
  const t = TRANSITIONS[command];
  if (!t.from.includes(m.phase)) {
    throw new PhaseError(
      `cannot ${t.verb} ${displayName(table)}: the migration is in phase ${m.phase}`,
      NEXT_STEP[m.phase],
    );
  }
  return m;
}

const LOCK_CLASS = 0x70677368; // 'pgsh'

/**
 * Takes the session advisory lock of the migration of `table` on the (single) connection of `sql`,
 * so that two pgshift processes never act on one migration at once. Released when the session ends.
 * Waits up to `waitMs` (default 5000) first: the session of a pgshift process that was just killed lives
 * on until its statement in flight ends and the server notices the client is gone.
 * @throws PgshiftError naming the backend pid that holds it.
 */
export async function lockMigration(sql: Sql, table: QualifiedName, waitMs = 5000): Promise<void> {
  const key = `${table.schema}.${table.name}`;
  const until = Date.now() + waitMs;
  for (;;) {
    const got = await sql`select pg_try_advisory_lock(${LOCK_CLASS}, hashtext(${key})) as ok`;
    if (got[0]?.ok) return;
    if (Date.now() >= until) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  // pg_locks shows the two int4 keys as oids (unsigned).
  const holder = await sql`
    select pid from pg_locks where locktype = 'advisory' and classid = ${LOCK_CLASS}::oid
       and objid = ((hashtext(${key})::bigint & 4294967295)::text)::oid and objsubid = 2 and granted limit 1`.catch(
    () => [],
  );
  const pid = holder[0]?.pid;
  throw new PgshiftError(
    `another pgshift process${pid ? ` (backend pid ${String(pid)})` : ""} is working on ${displayName(table)}`,
    {
      hint: "wait for it to finish, or stop it; every step can be re-run safely",
    },
  );
}

/**
 * The backend pid of the session holding the advisory lock of the migration of `table` (lockMigration) in
 * this database, or null when no session holds it. Read from pg_locks (PostgreSQL documentation, pg_locks:
 * an advisory lock on two int4 keys shows them as classid and objid, objsubid 2); takes no lock.
 */
export async function migrationLockHolder(sql: AnySql, table: QualifiedName): Promise<number | null> {
  const key = `${table.schema}.${table.name}`;
  const rows = await sql`
    select l.pid from pg_catalog.pg_locks l
     where l.locktype = 'advisory' and l.database = (select oid from pg_catalog.pg_database where datname =
       current_database())
       and l.classid = ${LOCK_CLASS}::oid and l.objid = ((hashtext(${key})::bigint & 4294967295)::text)::oid and
         l.objsubid = 2 and l.granted
     limit 1`;
  return rows[0] ? Number(rows[0].pid) : null;
}

/** Releases the advisory lock (also released when the connection closes). */
export async function unlockMigration(sql: Sql, table: QualifiedName): Promise<void> {
  await sql`select pg_advisory_unlock(${LOCK_CLASS}, hashtext(${`${table.schema}.${table.name}`}))`;
}
