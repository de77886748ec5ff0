import { z } from "zod";
import type { TableFacts } from "../catalog/inspect.js";
import type { AnySql, LockRetryOptions, Sql } from "../db.js";
import { DEFAULT_LOCK_TIMEOUT_MS, withLockRetry } from "../db.js";
import { sqlState } from "../errors.js";
import { LockSite, lockedTransaction } from "../locks/holders.js";
import { log } from "../log.js";
import { isStreaming, type StreamingMigration } from "../migration/state.js";
import { displayName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import { type BlockStep, block, check, runSteps, type Step, statement } from "../plan/steps.js";
import { type Mirror, type MirrorHealth, triggerMirror } from "./mirror.js";
import { removeMirrorTriggerSql, truncateGuardSql } from "./trigger.js";

/**
 * Reasons the logical mirror cannot work on this server and table; empty when it can.
 * Checked before anything is created (docs: "Logical Replication", "Configuration Settings",
 * "Replication Slots"; CREATE PUBLICATION needs CREATE on the database; a published table without a
 * usable replica identity makes the application's UPDATE and DELETE fail).
 */
export async function logicalPrerequisites(sql: Sql, facts: TableFacts): Promise<string[]> {
  const r = await sql`
    select current_setting('wal_level') as wal_level,
           current_setting('max_replication_slots')::int as max_slots,
           (select count(*) from pg_replication_slots)::int as slots,
           current_setting('max_wal_senders')::int as max_senders,
           (select count(*) from pg_stat_replication)::int as senders,
           (select rolreplication or rolsuper from pg_roles where rolname = current_user) as can_replicate,
           has_database_privilege(current_database(), 'CREATE') as can_publish,
           (select relreplident::text from pg_class where oid = ${facts.oid}) as replident,
           exists (select from pg_index where indrelid = ${facts.oid} and indisprimary) as has_pk,
           exists (select from pg_index where indrelid = ${facts.oid} and indisreplident) as has_replident_index`;
  const x = r[0]!;
  const out: string[] = [];
  if (x.wal_level !== "logical")
    out.push(
      `wal_level is ${String(x.wal_level)}, --mode logical needs wal_level = logical (set it and restart the server, ` +
        `or use --mode trigger)`,
    );
  if (Number(x.slots) >= Number(x.max_slots))
    out.push(`no free replication slot (${String(x.slots)} of max_replication_slots = ${String(x.max_slots)} in use)`);
  if (Number(x.senders) >= Number(x.max_senders))
    out.push(`no free WAL sender (${String(x.senders)} of max_wal_senders = ${String(x.max_senders)} in use)`);
  if (!x.can_replicate)
    out.push(`the current user lacks the REPLICATION privilege (ALTER ROLE ... REPLICATION), needed to stream changes`);
  if (!x.can_publish)
    out.push(`the current user may not create publications in this database (needs CREATE on the database)`);
  const ri = String(x.replident);
  if (ri === "n")
    out.push(
      `${facts.table.schema}.${facts.table.name} has REPLICA IDENTITY NOTHING: its UPDATEs and DELETEs cannot be ` +
        `streamed (ALTER TABLE ... REPLICA IDENTITY DEFAULT)`,
    );
  else if (ri === "d" && !x.has_pk)
    out.push(
      `${facts.table.schema}.${facts.table.name} has no primary key for REPLICA IDENTITY DEFAULT: its UPDATEs and ` +
        `DELETEs would fail once published (ALTER TABLE ... REPLICA IDENTITY USING INDEX <unique index>)`,
    );
  else if (ri === "i" && !x.has_replident_index)
    out.push(`${facts.table.schema}.${facts.table.name} has REPLICA IDENTITY USING INDEX but the index is gone`);
  return out;
}

/**
 * Statements that create the stream, in order, each on its own (a slot cannot be created in a transaction that wrote).
 */
export function createStreamSql(source: QualifiedName, slot: string, publication: string): string[] {
  return [
    // The publication must exist before the slot: pgoutput reads publication membership from the
    // catalog as of each change, and changes before the publication existed would not be sent.
    `CREATE PUBLICATION ${quoteIdent(publication)} FOR TABLE ${quoteQualified(source)}`,
    `${CREATE_SLOT}${quoteLiteral(slot)}, 'pgoutput')`,
  ];
}

const CREATE_SLOT = "SELECT pg_create_logical_replication_slot(";
/** Whether `statement` (one of createStreamSql's) creates the slot: start runs it under statement_timeout. */
export const createsSlot = (statement: string): boolean => statement.startsWith(CREATE_SLOT);

const OpenTransaction = z.object({
  pid: z.number(),
  state: z.string().nullable(),
  xact_start: z.date().nullable(),
  application_name: z.string().nullable(),
});

/** Other sessions' transactions that hold a transaction id (those a new slot's snapshot waits for), oldest first. */
export async function transactionsHoldingXids(sql: AnySql): Promise<z.infer<typeof OpenTransaction>[]> {
  const rows = await sql`
    select pid, state, xact_start, application_name from pg_catalog.pg_stat_activity
     where backend_xid is not null and pid <> pg_catalog.pg_backend_pid()
     order by xact_start nulls last`;
  return z.array(OpenTransaction).parse(rows);
}

/** Those sessions as start names them: `pid 123 (idle in transaction since <time>, <application>)`, 5 at most. */
export const describeTransactions = (ts: z.infer<typeof OpenTransaction>[]) =>
  ts
    .slice(0, 5)
    .map(
      (t) =>
        `pid ${t.pid} (${t.state ?? "?"}${
          t.xact_start ? ` since ${t.xact_start.toISOString()}` : ""
        }${t.application_name ? `, ${t.application_name}` : ""})`,
    )
    .join(", ") + (ts.length > 5 ? ` and ${ts.length - 5} more` : "");

/** The slot is still in use after its consumer was ended (one attached again): the block runs again. */
class SlotInUse extends Error {}

/**
 * The block that drops `slot`: end its consumer, wait until no process uses it, drop it (if it still
 * exists); run again from the start when a consumer attached again meanwhile (SQLSTATE 55006), at most 25 times.
 */
function dropSlotBlock(slot: string): BlockStep {
  const lit = quoteLiteral(slot);
  const steps: Step[] = [
    statement(
      "SELECT pg_terminate_backend(active_pid) FROM pg_catalog.pg_replication_slots " +
        `WHERE slot_name = ${lit} AND active_pid IS NOT NULL`,
      "session",
    ),
    check(`wait until no process uses replication slot ${slot} (at most 2 s)`, async (sql) => {
      for (let i = 0; i < 20; i++) {
        const s = await sql`select active_pid from pg_catalog.pg_replication_slots where slot_name = ${slot}`;
        if (s.length === 0 || s[0]!.active_pid === null) return;
        await new Promise((r) => setTimeout(r, 100));
      }
      throw new SlotInUse(`replication slot ${slot} is still in use`);
    }),
    statement(
      `SELECT pg_drop_replication_slot(${lit}) FROM pg_catalog.pg_replication_slots WHERE slot_name = ${lit}`,
      "session",
    ),
  ];
  return block(
    "once or more",
    `drop replication slot ${slot}; again while a consumer attaches meanwhile (at most 25 times)`,
    steps,
    async (sql) => {
      for (let attempt = 1; ; attempt++) {
        try {
          return await runSteps(sql, steps);
        } catch (err) {
          if (attempt >= 25 || !(err instanceof SlotInUse || sqlState(err) === "55006")) throw err;
        }
      }
    },
  );
}

/**
 * The steps that drop the stream, as --dry-run prints them and abort, finalize and cutover run them
 * (runLocked): end the slot's consumer and drop the slot (if it still exists), then one transaction under
 * `opts.lockTimeoutMs` (default DEFAULT_LOCK_TIMEOUT_MS): `opts.forget` (a statement of pgshift's own, e.g. the
 * UPDATE that clears the names in the migration row), the look for sessions the lock would queue behind
 * (LockSite, src/locks/holders.ts: autovacuum cancelled, holders reported; `opts.lock.terminateAfterMs`), a lock
 * of the published table (`table`: the source, under whatever name it has now) IN SHARE MODE, DROP PUBLICATION
 * (see dropPublication for why the lock). Empty when there is nothing to drop or forget.
 * @param opts.lock the migration's table as displayed and the command, for the logs and events.
 */
export function dropStreamSql(
  slot: string | null,
  publication: string | null,
  table: QualifiedName,
  opts: {
    lockTimeoutMs?: number;
    forget?: string;
    lock?: { table: string; command: string; terminateAfterMs?: number | null };
  } = {},
): Step[] {
  const out: Step[] = [];
  if (slot) out.push(dropSlotBlock(slot));
  const lockTimeoutMs = opts.lockTimeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS;
  const site = new LockSite([{ table, mode: "SHARE" }], {
    table: opts.lock?.table ?? displayName(table),
    command: `${opts.lock?.command ?? "drop"}: publication`,
    lockTimeoutMs,
    terminateAfterMs: opts.lock?.terminateAfterMs ?? null,
  });
  const tx = [
    ...(opts.forget ? [statement(opts.forget)] : []),
    ...(publication
      ? [
          ...site.steps(statement(`LOCK TABLE ${quoteQualified(table)} IN SHARE MODE`)),
          statement(`DROP PUBLICATION IF EXISTS ${quoteIdent(publication)}`),
        ]
      : []),
  ];
  if (tx.length > 0) out.push(lockedTransaction(tx, { lockTimeoutMs }, publication ? [site] : []));
  return out;
}

/**
 * Drops the slot (after terminating a consumer still attached to it: the block of dropStreamSql) and the
 * publication, if they exist. Non-transactional, idempotent: run by failed starts (the commands that know the
 * published table run dropStreamSql's steps).
 * @param opts lock_timeout and retries for the SHARE locks of dropPublication; `force`: when the locks are
 *   not granted, drop the publication without them (a start cleaning up after itself must leave nothing).
 * @throws PgshiftError (55P03) when the published table stays locked through every retry (unless `force`).
 */
export async function dropStream(
  sql: Sql,
  slot: string | null,
  publication: string | null,
  opts: LockRetryOptions & { force?: boolean } = {},
): Promise<void> {
  if (slot) await runSteps(sql, [dropSlotBlock(slot)]);
  if (publication) await dropPublication(sql, publication, opts);
}

/**
 * DROP PUBLICATION while holding a SHARE lock on each table in it, in one short transaction (lock_timeout
 * and retries as for cutover: withLockRetry). An UPDATE or DELETE on a published table looks the
 * publication up by OID while it checks the replica identity; dropped in between, the application's
 * statement fails with "cache lookup failed for publication" (PostgreSQL 17; 1,439 of 87,000 updates failed
 * in a 15 s loop of CREATE and DROP PUBLICATION, none with the lock). SHARE conflicts with their ROW
 * EXCLUSIVE: the writes in flight finish first, new ones wait the few ms of the DROP ("Explicit Locking").
 */
async function dropPublication(
  sql: Sql,
  publication: string,
  opts: LockRetryOptions & { force?: boolean },
): Promise<void> {
  try {
    await dropPublicationLocked(sql, publication, opts);
  } catch (err) {
    if (!opts.force || sqlState((err as { cause?: unknown }).cause ?? err) !== "55P03") throw err;
    log().warn({ publication }, "the published table stays locked: dropping the publication without its SHARE lock");
    await sql.unsafe(`drop publication if exists ${quoteIdent(publication)}`);
  }
}

async function dropPublicationLocked(sql: Sql, publication: string, opts: LockRetryOptions): Promise<void> {
  await withLockRetry(
    sql,
    async (tx) => {
      const tables = z.array(PublishedTable).parse(
        await tx`select schemaname, tablename from pg_catalog.pg_publication_tables where pubname = ${publication}
            order by 1, 2`,
      );
      for (const t of tables)
        await tx.unsafe(`lock table ${quoteQualified({ schema: t.schemaname, name: t.tablename })} in share mode`);
      await tx.unsafe(`drop publication if exists ${quoteIdent(publication)}`);
    },
    opts,
  );
}

const PublishedTable = z.object({ schemaname: z.string(), tablename: z.string() });

export interface SlotState {
  slot: string;
  exists: boolean;
  /** A consumer (pgshift sync, or another command's applier) is attached. */
  active: boolean;
  activePid: number | null;
  /** WAL the slot keeps on disk: pg_current_wal_lsn() - restart_lsn, bytes. */
  retainedBytes: number;
  confirmedLsn: string | null;
  /** pg_current_wal_lsn() - confirmed_flush_lsn, bytes. */
  lagBytes: number;
  /**
   * replay_lag of the attached consumer as PostgreSQL measures it, seconds (0 when caught up, null when none attached).
   */
  lagSeconds: number | null;
  currentLsn: string;
  /**
   * pg_replication_slots.wal_status (PostgreSQL 13+): reserved, extended, unreserved (past
   * max_slot_wal_keep_size: invalidated at the next checkpoint unless the consumer catches up) or lost.
   */
  walStatus: string | null;
  /**
   * Why PostgreSQL invalidated the slot (invalidation_reason, PostgreSQL 17+; "wal_removed" for a lost slot before 17);
   * null while usable.
   */
  invalidated: string | null;
}

/** Reads the slot's position and the lag from pg_replication_slots and pg_stat_replication. */
export async function slotState(sql: AnySql, slot: string): Promise<SlotState> {
  const r = await sql`
    select s.slot_name is not null as exists, coalesce(s.active, false) as active, s.active_pid,
           coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn), 0)::bigint as retained,
           s.confirmed_flush_lsn::text as confirmed,
           coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn), 0)::bigint as lag,
           extract(epoch from r.replay_lag)::float8 as lag_seconds,
           pg_current_wal_lsn()::text as current,
           s.wal_status,
           -- to_jsonb: invalidation_reason exists from PostgreSQL 17 on, and reads as NULL before.
           to_jsonb(s) ->> 'invalidation_reason' as invalidation_reason
      from (select 1) one
      left join pg_replication_slots s on s.slot_name = ${slot}
      left join pg_stat_replication r on r.pid = s.active_pid`;
  const x = r[0]!;
  return {
    slot,
    exists: Boolean(x.exists),
    active: Boolean(x.active),
    activePid: x.active_pid === null ? null : Number(x.active_pid),
    retainedBytes: Number(x.retained),
    confirmedLsn: x.confirmed === null ? null : String(x.confirmed),
    lagBytes: Math.max(0, Number(x.lag)),
    lagSeconds: x.active ? (x.lag_seconds === null ? 0 : Number(x.lag_seconds)) : null,
    currentLsn: String(x.current),
    walStatus: x.wal_status === null || x.wal_status === undefined ? null : String(x.wal_status),
    invalidated: x.invalidation_reason ? String(x.invalidation_reason) : x.wal_status === "lost" ? "wal_removed" : null,
  };
}

/** 'X/Y' LSN text as a number of bytes, for comparisons. */
export function lsnToBigInt(lsn: string): bigint {
  const [hi, lo] = lsn.split("/");
  return (BigInt(`0x${hi ?? "0"}`) << 32n) + BigInt(`0x${lo ?? "0"}`);
}

/**
 * The logical mirror. Before cutover the shadow is fed by the replication slot (the applier in
 * mirror/apply.ts); the live table only carries the TRUNCATE guard, nothing on the write path.
 * From cutover on, writes to the new live table reach the retired table through row triggers (the trigger
 * mirror), and after a swap-back the shadow is fed by row triggers too: see docs/logical-mode.md for why.
 */
export const logicalMirror: Mirror = {
  mode: "logical",
  startSql(m) {
    if (m.phase === "cutover" || m.phase === "swapped_back") return triggerMirror.startSql(m);
    return truncateGuardSql(m.live);
  },
  stopSql(m) {
    return removeMirrorTriggerSql(m.live);
  },
  dropSql(m) {
    return triggerMirror.dropSql(m);
  },
  async health(sql, m): Promise<MirrorHealth> {
    if (m.phase === "cutover" || m.phase === "swapped_back" || !m.slot_name) {
      const h = await triggerMirror.health(sql, m);
      return { ...h, mode: "logical" };
    }
    const s = await slotState(sql, m.slot_name);
    return {
      mode: "logical",
      ok: s.exists && s.invalidated === null,
      detail: !s.exists
        ? `replication slot ${m.slot_name} is missing: changes are NOT mirrored`
        : s.invalidated !== null
          ? `replication slot ${m.slot_name} was invalidated by PostgreSQL (${s.invalidated}): changes are NOT mirrored`
          : `replication slot ${m.slot_name} ${
              s.active ? "streaming" : "idle (no consumer attached)"
            }, ${s.lagBytes} bytes behind`,
    };
  },
  streams(m): m is StreamingMigration {
    return isStreaming(m);
  },
  async follow(sql, m) {
    if (!isStreaming(m)) return null;
    // Loaded when needed: stream.ts builds on this module (lsnToBigInt, slotState).
    const { followStream } = await import("./stream.js");
    return followStream(sql, m);
  },
};
