import { z } from "zod";
import { requireNoKnownDifferences } from "../cutover/cutover.js";
import { type AnySql, DEFAULT_LOCK_TIMEOUT_MS, type LockRetryOptions, type Sql } from "../db.js";
import { pendingRebuilds } from "../dependents/materialized-views.js";
import { PgshiftError, sqlState } from "../errors.js";
import { LockSite, lockedTransaction, runLocked } from "../locks/holders.js";
import { log } from "../log.js";
import { handOff, requireHandOff } from "../maintain/partman.js";
import { recordSql } from "../maintain/registry.js";
import { dropStreamSql } from "../mirror/logical.js";
import { mirrorFor } from "../mirror/mirror.js";
import { MIRROR_TRIGGER, removeTruncateGuardSql, TRUNCATE_TRIGGER } from "../mirror/trigger.js";
import { displayName, type QualifiedName, quoteIdent, quoteQualified } from "../names.js";
import {
  check,
  runSteps,
  runTransaction,
  type Step,
  statement,
  statementsOf,
  type TransactionStep,
} from "../plan/steps.js";
import {
  loadMigration,
  lockMigration,
  logicalNames,
  type Migration,
  requireMigration,
  unlockMigration,
} from "./state.js";

/** Where an identity sequence stands and how it is defined (from pg_sequences), to re-create it at finalize. */
export interface IdentityState {
  next: string;
  increment: string;
  min: string;
  max: string;
  cache: string;
  cycle: boolean;
}

/**
 * Statements of finalize (phase cutover): stop the reverse mirror, remove the TRUNCATE guard from the live
 * table, drop the retired table and the mirror function, re-create identity columns on the live table from
 * their old sequence's position and options, give the partitioned table's indexes the original names,
 * forget the migration. Identity sequences belong to their column and go with the retired table, so their
 * state is read first (`identities`: column -> state).
 */
export function finalizeSql(m: Migration, identities: Map<string, IdentityState>): string[] {
  const mirror = mirrorFor(m.mode);
  const live = quoteQualified(m.live);
  // The migration is forgotten first: the DDL guard refuses to drop a table of a migration in progress.
  const out = [
    `LOCK TABLE ${live}, ${quoteQualified(m.copy)} IN ACCESS EXCLUSIVE MODE`,
    `DELETE FROM pgshift.migrations WHERE id = ${m.id}`,
    ...mirror.stopSql(m),
    ...removeTruncateGuardSql(m.live),
  ];
  const ids = m.sequences.filter((x) => x.identity !== "");
  // The live table's default calls the identity sequence, which goes with the retired table.
  for (const s of ids) out.push(`ALTER TABLE ${live} ALTER COLUMN ${quoteIdent(s.column)} DROP DEFAULT`);
  out.push(`DROP TABLE ${quoteQualified(m.copy)}`);
  for (const s of ids) {
    const st = identities.get(s.column);
    const opts = st
      ? ` INCREMENT BY ${st.increment} MINVALUE ${st.min} MAXVALUE ${st.max} ` +
        `CACHE ${st.cache} ${st.cycle ? "CYCLE" : "NO CYCLE"} START WITH ${st.next}`
      : "";
    out.push(
      `ALTER TABLE ${live} ALTER COLUMN ${quoteIdent(s.column)} ADD GENERATED ${
        s.identity === "a" ? "ALWAYS" : "BY DEFAULT"
      } AS IDENTITY (SEQUENCE NAME ${quoteQualified({ schema: s.schema, name: s.name })}${opts})`,
    );
    if (s.defaultFunction)
      out.push(`DROP FUNCTION IF EXISTS ${quoteQualified({ schema: "pgshift", name: s.defaultFunction })}()`);
  }
  for (const r of m.index_renames) {
    out.push(
      `ALTER INDEX IF EXISTS ${quoteQualified({ schema: m.live.schema, name: r.from })} RENAME TO ${quoteIdent(r.to)}`,
    );
  }
  out.push(...mirror.dropSql(m));
  // What pgshift maintain keeps (schema version 7): the table and its spec.
  out.push(recordSql(m));
  return out;
}

/** State of each identity sequence (column -> state), read where finalize will re-create the identity. */
async function identityState(sql: AnySql, m: Migration): Promise<Map<string, IdentityState>> {
  const out = new Map<string, IdentityState>();
  for (const s of m.sequences.filter((x) => x.identity !== "")) {
    const r = await sql.unsafe(
      `select case when sq.is_called then sq.last_value + ps.increment_by else sq.last_value end::text as next,
             ps.increment_by::text as increment, ps.min_value::text as min, ps.max_value::text as max,
             ps.cache_size::text as cache, ps.cycle
        from ${quoteQualified({ schema: s.schema, name: s.name })} sq, pg_sequences ps
       where ps.schemaname = $1 and ps.sequencename = $2`,
      [s.schema, s.name],
    );
    const x = r[0];
    if (x)
      out.set(s.column, {
        next: String(x.next),
        increment: String(x.increment),
        min: String(x.min),
        max: String(x.max),
        cache: String(x.cache),
        cycle: Boolean(x.cycle),
      });
  }
  return out;
}

/**
 * A replication slot or publication named for `table` (pgshift_<oid>) with no migration row: what a start
 * that crashed between creating them and committing leaves behind. Null when there is none.
 */
export async function leftoverStream(
  sql: AnySql,
  table: QualifiedName,
): Promise<{ slot: string | null; publication: string | null; retainedBytes: number } | null> {
  const r =
    await sql`select c.oid::int as oid from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname =
      ${table.schema} and c.relname = ${table.name}`;
  if (r.length === 0) return null;
  const names = logicalNames(Number(r[0]!.oid));
  const x = await sql`
    select (select slot_name::text from pg_replication_slots where slot_name = ${names.slot}) as slot,
           (select pubname::text from pg_publication where pubname = ${names.publication}) as publication,
           coalesce((select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) from pg_replication_slots where slot_name
             = ${names.slot}), 0)::bigint as retained`;
  const slot = (x[0]!.slot as string | null) ?? null;
  const publication = (x[0]!.publication as string | null) ?? null;
  return slot || publication ? { slot, publication, retainedBytes: Number(x[0]!.retained) } : null;
}

/**
 * Statements of abort (before cutover): stop the mirror, remove the TRUNCATE guard from the live table, drop the
 * shadow and the mirror function, forget the migration.
 */
export function abortSql(m: Migration): string[] {
  const mirror = mirrorFor(m.mode);
  return [
    `LOCK TABLE ${quoteQualified(m.live)} IN SHARE ROW EXCLUSIVE MODE`,
    // First: the DDL guard refuses to drop a table of a migration in progress.
    `DELETE FROM pgshift.migrations WHERE id = ${m.id}`,
    ...mirror.stopSql(m),
    ...removeTruncateGuardSql(m.live),
    `DROP TABLE IF EXISTS ${quoteQualified(m.copy)}`,
    ...m.sequences
      .filter((s) => s.defaultFunction)
      .map((s) => `DROP FUNCTION IF EXISTS ${quoteQualified({ schema: "pgshift", name: s.defaultFunction! })}()`),
    ...mirror.dropSql(m),
  ];
}

export interface FinishOptions extends LockRetryOptions {
  /**
   * Terminate sessions holding a conflicting lock on the tables (or their partitions) whose transaction is at
   * least this old, ms, before locking (src/locks/holders.ts); absent: never. CLI: --terminate-holders-after.
   */
  terminateHoldersAfterMs?: number | null;
  /** finalize only: the person confirmed that the retired table may be dropped. */
  yes?: boolean;
  /** finalize only: return the statements without running them. */
  dryRun?: boolean;
  /** finalize only: then register the table with pg_partman (src/maintain/partman.ts). */
  handOff?: "pg_partman";
  /** The migration group this runs for (finalize --group, abort --group): a table of a group is refused alone. */
  group?: string;
  /**
   * finalize --group --dry-run: the retired tables the group's finalize drops before this table's (nothing is
   * dropped by a dry run, so a foreign key of one of them to this retired table would otherwise look in the way).
   */
  droppedBefore?: readonly QualifiedName[];
}

/**
 * Refuses to finalize or abort a table of a migration group on its own (the other tables reference it, or it them:
 * src/group/finish.ts orders them); `group` is the group the command acts for, if any.
 * @throws PgshiftError naming the group, with the command to run.
 */
function requireAlone(m: Migration, command: "finalize" | "abort", group: string | undefined): void {
  if (m.group_name === null || m.group_name === group) return;
  throw new PgshiftError(
    `${displayName(m.live)} belongs to migration group ${m.group_name}: its tables ${command} together`,
    { hint: `run pgshift ${command} --group ${m.group_name}${command === "finalize" ? " --yes" : ""}` },
  );
}

const Dependent = z.object({ what: z.string() });

/**
 * The objects that keep `table` from being dropped without CASCADE, one description each ("view
 * public.orders_report", "function public.order_total(bigint)", "table column public.archive.snapshot",
 * "table constraint archive_order_fkey on public.archive"), sorted; empty when DROP TABLE would go through.
 * Read from pg_depend as DROP ... RESTRICT decides ("pg_depend" in the PostgreSQL documentation): what the
 * drop takes along is the table and, recursively, every object with an automatic ('a') or internal ('i')
 * dependency on something taken along (its indexes, constraints, triggers, row type and array type, owned
 * sequences, policies); anything else with a normal ('n') dependency on one of those blocks the drop: a
 * view or a rule, a function whose BEGIN ATOMIC body uses the table or whose signature uses its row type, a
 * column of another table of its row type, a foreign key referencing it. pgshift's own objects (its triggers,
 * the functions in the pgshift schema) are left out: finalize drops them itself.
 * @param table the table as it is named now (the retired table at finalize).
 * @param alsoDropped tables dropped before this one in the same run (a group's finalize --dry-run: the retired tables
 *   of the members finalized first); what depends on them is taken along with them, not in the way.
 */
export async function dependentsOf(
  sql: AnySql,
  table: QualifiedName,
  alsoDropped: readonly QualifiedName[] = [],
): Promise<string[]> {
  const all = [table, ...alsoDropped];
  const rows = await sql`
    with recursive dropped(classid, objid) as (
      select 'pg_catalog.pg_class'::regclass::oid, c.oid
        from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
       where (n.nspname, c.relname) in (select * from unnest(${all.map((t) => t.schema)}::text[],
                                                              ${all.map((t) => t.name)}::text[]))
      union
      select d.classid, d.objid
        from pg_catalog.pg_depend d join dropped x on d.refclassid = x.classid and d.refobjid = x.objid
       where d.deptype in ('a', 'i')
    ),
    blockers as (
      select d.classid, d.objid, d.objsubid
        from pg_catalog.pg_depend d join dropped x on d.refclassid = x.classid and d.refobjid = x.objid
       where d.deptype = 'n'
         and not exists (select from dropped y where y.classid = d.classid and y.objid = d.objid)
         and not (d.classid = 'pg_catalog.pg_proc'::regclass
                  and exists (select from pg_catalog.pg_proc p where p.oid = d.objid and p.pronamespace =
                    to_regnamespace('pgshift')))
         and not (d.classid = 'pg_catalog.pg_trigger'::regclass
                  and exists (select from pg_catalog.pg_trigger t where t.oid = d.objid and t.tgname in
                    (${MIRROR_TRIGGER}, ${TRUNCATE_TRIGGER})))
    ),
    named as (
      -- a view's dependency is its _RETURN rule's: name the view, as PostgreSQL's DETAIL does
      select distinct coalesce(v.classid, b.classid) as classid, coalesce(v.objid, b.objid) as objid,
                      case when v.objid is null then b.objsubid else 0 end as objsubid
        from blockers b
        left join lateral (select 'pg_catalog.pg_class'::regclass::oid as classid, r.ev_class as objid
                             from pg_catalog.pg_rewrite r
                            where b.classid = 'pg_catalog.pg_rewrite'::regclass and r.oid = b.objid
                              and r.rulename = '_RETURN') v on true
    )
    select distinct i.type || ' ' || i.identity as what
      from named b, lateral pg_catalog.pg_identify_object(b.classid, b.objid, b.objsubid) i
     order by 1`;
  return z
    .array(Dependent)
    .parse(rows)
    .map((r) => r.what);
}

/** The refusal for objects that still depend on the retired table (`dependents`: their descriptions; 25 are named). */
function dependentsError(m: Migration, dependents: readonly string[], cause?: unknown): PgshiftError {
  return new PgshiftError(
    `cannot finalize ${displayName(m.live)}: ${
      dependents.length === 1 ? "an object still depends" : `${dependents.length} objects still depend`
    } on the retired table ${displayName(m.copy)}, which ` +
      `finalize drops: ${dependents.slice(0, 25).join(", ")}${
        dependents.length > 25 ? ` and ${dependents.length - 25} more` : ""
      }`,
    {
      hint:
        `drop them, or re-create them on ${displayName(m.live)} (CREATE OR REPLACE VIEW / FUNCTION, ALTER TABLE ` +
        `... ALTER COLUMN ... TYPE), then run finalize again; nothing was changed`,
      cause,
    },
  );
}

/**
 * What PostgreSQL's DETAIL of a failed DROP (SQLSTATE 2BP01, dependent_objects_still_exist) names, one entry
 * per line: "view public.v depends on table public.t" becomes "view public.v".
 */
export function dependentsFromDetail(detail: string): string[] {
  return detail
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "")
    .map((l) => l.replace(/ depends on .*$/, ""));
}

/**
 * Refuses to finalize (nothing changed) while the last verify found differences (requireNoKnownDifferences:
 * the retired table may hold the only copy of rows the live table lacks) or while objects other than
 * pgshift's own depend on the retired table (dependentsOf: DROP TABLE would fail, or with CASCADE take them).
 * @throws PgshiftError listing the counts, or the dependents by name.
 */
async function requireFinalizable(
  sql: AnySql,
  m: Migration,
  droppedBefore: readonly QualifiedName[] = [],
): Promise<void> {
  requireNoKnownDifferences(m, "finalize");
  const dependents = await dependentsOf(sql, m.copy, droppedBefore);
  if (dependents.length > 0) throw dependentsError(m, dependents);
}

/** The retry options of a lock retry, from the command's (retries, deadline, onRetry). */
function lockRetryOf(opts: LockRetryOptions) {
  return {
    ...(opts.retries !== undefined ? { retries: opts.retries } : {}),
    ...(opts.deadlineMs !== undefined ? { deadlineMs: opts.deadlineMs } : {}),
    ...(opts.onRetry ? { onRetry: opts.onRetry } : {}),
  };
}

/** What finalize and abort did (or, with `dryRun`, would do). */
export interface FinishResult {
  /** Every statement, in order, as PostgreSQL receives them. */
  statements: string[];
  /** The plan: what --dry-run prints (formatSteps). */
  steps: Step[];
}

/**
 * Finalize's transaction, from the state the identity sequences are in now (read on `sql`): lock both
 * tables, check again under the lock, then finalizeSql's statements (the migration row deleted first).
 */
async function finalizeTransaction(
  sql: AnySql,
  m: Migration,
  table: QualifiedName,
  lockTimeoutMs: number,
  site: LockSite,
): Promise<TransactionStep> {
  const [lock, ...rest] = finalizeSql(m, await identityState(sql, m));
  return lockedTransaction(
    [
      // Nothing can come to depend on the retired table after this lock (CREATE VIEW, a foreign key, ... lock
      // the tables they use), nor a verify run meanwhile. Looked at first: autovacuum cancelled, holders reported.
      ...site.steps(statement(lock!)),
      check(
        "refuse if the migration left phase cutover, a verify found differences, or objects depend on " +
          displayName(m.copy),
        async (tx) => {
          const now = await loadMigration(tx, table, { upgrade: false });
          if (now?.phase !== "cutover")
            throw new PgshiftError(`the migration of ${displayName(table)} changed phase meanwhile`);
          await requireFinalizable(tx, now);
        },
      ),
      ...rest.map((s) => statement(s)),
    ],
    { lockTimeoutMs },
    [site],
  );
}

/** Where finalize and abort lock the live table (and the other one): the look before, the events. */
function finishSite(
  m: Migration,
  command: "finalize" | "abort",
  lockTimeoutMs: number,
  terminateAfterMs?: number | null,
) {
  return new LockSite(
    command === "finalize"
      ? [
          { table: m.live, mode: "ACCESS EXCLUSIVE" },
          { table: m.copy, mode: "ACCESS EXCLUSIVE" },
        ]
      : [
          { table: m.live, mode: "SHARE ROW EXCLUSIVE" },
          // DROP TABLE takes ACCESS EXCLUSIVE on the shadow and its partitions while the live table is locked.
          { table: m.copy, mode: "ACCESS EXCLUSIVE" },
        ],
    {
      table: displayName({ schema: m.source_schema, name: m.source_table }),
      command,
      lockTimeoutMs,
      terminateAfterMs: terminateAfterMs ?? null,
    },
  );
}

/**
 * After cutover: drops the retired table, the reverse mirror and the migration's metadata, in one
 * transaction (before it, a replication slot and publication a crash left behind: dropStreamSql). After
 * this, swap-back is no longer possible. Refuses first, changing nothing, while the last verify found
 * differences or while anything but pgshift's own objects depends on the retired table (checked before and
 * again under the transaction's locks; a DROP that still fails with dependent_objects_still_exist is
 * reported with the objects from PostgreSQL's DETAIL, and the whole transaction rolls back). `dryRun` checks
 * the same, then returns the plan without running it. The transaction's statements are built again inside
 * it, from the identity sequences' positions then (the only values that may differ from the dry run's).
 * @throws PgshiftError without `yes`, or when refused as above; PhaseError unless the migration is in phase cutover.
 */
export async function finalize(sql: Sql, table: QualifiedName, opts: FinishOptions = {}): Promise<FinishResult> {
  await lockMigration(sql, table);
  try {
    const m = await requireMigration(sql, table, "finalize", { upgrade: !opts.dryRun });
    requireAlone(m, "finalize", opts.group);
    if (!opts.yes && !opts.dryRun) {
      throw new PgshiftError(`finalize drops ${displayName(m.copy)} and makes swap-back impossible`, {
        hint: "run it again with --yes to confirm",
      });
    }
    const lockTimeoutMs = opts.lockTimeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS;
    const lockOpts = { table: displayName(table), command: "finalize", terminateAfterMs: opts.terminateHoldersAfterMs };
    const site = finishSite(m, "finalize", lockTimeoutMs, opts.terminateHoldersAfterMs);
    if (opts.handOff) await requireHandOff(sql, table, m.spec);
    // A materialized view whose rebuild after cutover did not finish still reads the retired table: finish it first.
    const rebuilds = (await pendingRebuilds(sql, m, lockTimeoutMs)).flatMap((p) => p.steps);
    if (rebuilds.length > 0 && !opts.dryRun) await runSteps(sql, rebuilds, { lockRetry: { retries: opts.retries } });
    if (!opts.dryRun || rebuilds.length === 0)
      await requireFinalizable(sql, m, opts.dryRun ? (opts.droppedBefore ?? []) : []);
    // Normally dropped at cutover already; a crash in between leaves them: never leave a slot behind.
    const stream = dropStreamSql(m.slot_name, m.publication_name, m.copy, { lockTimeoutMs, lock: lockOpts });
    const planned = await finalizeTransaction(sql, m, table, lockTimeoutMs, site);
    if (opts.dryRun) {
      const steps = [...rebuilds, ...stream, planned];
      if (opts.handOff)
        steps.push(check("then the hand-off to pg_partman: pgshift maintain <table> --hand-off pg_partman --dry-run"));
      return { statements: statementsOf(steps), steps };
    }
    await runLocked(sql, stream, { lockRetry: lockRetryOf(opts) });
    let ran = planned;
    await runTransaction(
      sql,
      planned,
      async (tx) => {
        ran = await finalizeTransaction(tx, m, table, lockTimeoutMs, site);
        try {
          await runSteps(tx, ran.steps);
        } catch (err) {
          const e = err as { detail?: string };
          if (sqlState(err) === "2BP01" && e.detail) throw dependentsError(m, dependentsFromDetail(e.detail), err);
          throw err;
        }
      },
      { ...lockRetryOf(opts), onFailure: site.failed },
    );
    site.committed();
    log().info({ table: displayName(table) }, "finalized: retired table, mirror and metadata dropped");
    const steps: Step[] = [...rebuilds, ...stream, ran];
    if (opts.handOff) {
      const h = await handOff(sql, table, { lockTimeoutMs, retries: opts.retries }).catch((err: unknown) => {
        const e = err instanceof PgshiftError ? err : null;
        throw new PgshiftError(
          `finalized ${displayName(table)}, but the hand-off to pg_partman failed: ${
            e?.message ?? (err instanceof Error ? err.message : String(err))
          }`,
          {
            hint: `${e?.hint ? `${e.hint}; ` : ""}then: pgshift maintain ${displayName(table)} --hand-off pg_partman`,
            cause: err,
          },
        );
      });
      steps.push(...h.steps);
    }
    return { statements: statementsOf(steps), steps };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}

/**
 * The plan of abort, as --dry-run prints it and abort runs it: drop the replication slot and the publication
 * (logical mode), then abortSql's statements in one transaction. With no migration, the slot and publication a
 * start that crashed before committing left behind (leftoverStream).
 * @param opts `dryRun`: read an older pgshift schema as it is (no upgrade); `lockTimeoutMs` of its transactions
 *   (default DEFAULT_LOCK_TIMEOUT_MS, 50 ms); `terminateHoldersAfterMs` as for cutover.
 * @throws PgshiftError when there is no migration (nor anything left behind); PhaseError in phase cutover.
 */
export async function abortPlan(
  sql: AnySql,
  table: QualifiedName,
  opts: { dryRun?: boolean; lockTimeoutMs?: number; terminateHoldersAfterMs?: number | null; group?: string } = {},
): Promise<{ migration: Migration | null; steps: Step[] }> {
  const lockTimeoutMs = opts.lockTimeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS;
  const lock = { table: displayName(table), command: "abort", terminateAfterMs: opts.terminateHoldersAfterMs };
  if (!(await loadMigration(sql, table, { upgrade: !opts.dryRun }))) {
    const left = await leftoverStream(sql, table);
    if (left)
      return { migration: null, steps: dropStreamSql(left.slot, left.publication, table, { lockTimeoutMs, lock }) };
  }
  const m = await requireMigration(sql, table, "abort", { upgrade: !opts.dryRun });
  requireAlone(m, "abort", opts.group);
  const site = finishSite(m, "abort", lockTimeoutMs, opts.terminateHoldersAfterMs);
  const [first, ...rest] = abortSql(m);
  return {
    migration: m,
    steps: [
      ...dropStreamSql(m.slot_name, m.publication_name, m.live, { lockTimeoutMs, lock }),
      lockedTransaction([...site.steps(statement(first!)), ...rest.map((s) => statement(s))], { lockTimeoutMs }, [
        site,
      ]),
    ],
  };
}

/**
 * Before cutover (or after a swap-back): drops the shadow and the mirror and forgets the migration,
 * leaving the source table exactly as it was. Runs abortPlan's steps.
 * @throws PhaseError in phase cutover (swap back first).
 */
export async function abort(
  sql: Sql,
  table: QualifiedName,
  opts: LockRetryOptions & { terminateHoldersAfterMs?: number | null; group?: string } = {},
): Promise<FinishResult> {
  await lockMigration(sql, table);
  try {
    const plan = await abortPlan(sql, table, {
      lockTimeoutMs: opts.lockTimeoutMs,
      terminateHoldersAfterMs: opts.terminateHoldersAfterMs ?? null,
      ...(opts.group !== undefined ? { group: opts.group } : {}),
    });
    await runLocked(sql, plan.steps, { lockRetry: lockRetryOf(opts) });
    if (plan.migration)
      log().info({ table: displayName(table) }, "aborted: shadow and mirror dropped, source untouched");
    else
      log().info(
        { table: displayName(table) },
        "aborted: removed the replication slot and publication a crashed start left behind",
      );
    return { statements: statementsOf(plan.steps), steps: plan.steps };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}
