import { z } from "zod";
import type { AnySql } from "./db.js";
import { type Migration, migrationLockHolder } from "./migration/state.js";
import type { SlotState } from "./mirror/logical.js";
import { displayName, type QualifiedName } from "./names.js";

/** A server session as status shows it: from pg_stat_activity. */
export interface SessionInfo {
  /** Backend pid (pg_stat_activity.pid): what pg_terminate_backend() takes. */
  pid: number;
  /** Its application_name: `pgshift <command>` for pgshift's CLI (unless the user set one: PGAPPNAME, ...). */
  applicationName: string | null;
  /** The pgshift command read from the application_name (`backfill`, `cutover`, ...), or null when it does not say. */
  command: string | null;
  /**
   * When its session started (ISO 8601): a pgshift command connects once, so about when it started. null when not
   * visible to this role.
   */
  since: string | null;
  /** pg_stat_activity.state (active, idle, idle in transaction, ...), or null when not visible to this role. */
  state: string | null;
}

/** Whether anything works on the migration right now, and when something last happened. */
export interface Liveness {
  /**
   * The session holding the migration's advisory lock (lockMigration): start, backfill, verify, cutover,
   * swap-back, finalize and abort hold it while they run; plan, status and sync do not. null: no pgshift
   * command is working on the migration (one killed with SIGKILL lets it go as soon as the server notices
   * the closed connection).
   */
  holder: SessionInfo | null;
  /** A backfill is copying or building indexes right now: the holder, in phase started or backfilling. */
  backfillRunning: boolean;
  /** Logical mode: the process streaming the replication slot (its walsender's pid), or null when none is attached. */
  streamConsumer: (SessionInfo & { walsenderPid: number }) | null;
  /**
   * When the backfill last committed a batch (ISO 8601): the migration row's updated_at while it is in phase
   * backfilling (only batches write it then); when the copy ended, after it; null before the backfill.
   */
  lastBatchAt: string | null;
  /** Logical mode: commit time of the last source transaction the stream applied (ISO 8601), or null. */
  lastAppliedCommitAt: string | null;
  /** When any pgshift command last wrote the migration's state (updated_at, ISO 8601). */
  lastStateChangeAt: string;
}

const ActivityRow = z.object({
  pid: z.coerce.number(),
  application_name: z.string().nullable(),
  backend_start: z.date().nullable(),
  state: z.string().nullable(),
});

/** application_name `pgshift backfill` (or `pgshift sync public.orders`) -> `backfill`; anything else -> null. */
export function commandOf(applicationName: string | null): string | null {
  const m = /^pgshift ([a-z-]+)/.exec(applicationName ?? "");
  return m ? m[1]! : null;
}

async function session(sql: AnySql, pid: number): Promise<SessionInfo> {
  const rows =
    await sql`select pid, application_name, backend_start, state from pg_catalog.pg_stat_activity where pid = ${pid}`;
  const r = rows[0] ? ActivityRow.parse(rows[0]) : null;
  return {
    pid,
    applicationName: r?.application_name ?? null,
    command: commandOf(r?.application_name ?? null),
    since: r?.backend_start?.toISOString() ?? null,
    state: r?.state ?? null,
  };
}

/**
 * Reads who works on the migration `m` of `table` right now (pg_locks for the migration's advisory lock,
 * pg_stat_activity for the session: PostgreSQL documentation, 54.12 pg_locks and 27.2.3
 * pg_stat_activity) and when its last batch or applied change happened. Takes no lock.
 * @param slot the slot's state when the migration streams (logical mode, before cutover), else null.
 */
export async function liveness(
  sql: AnySql,
  table: QualifiedName,
  m: Migration,
  slot: SlotState | null,
): Promise<Liveness> {
  const holderPid = await migrationLockHolder(sql, table);
  const holder = holderPid === null ? null : await session(sql, holderPid);
  let streamConsumer: Liveness["streamConsumer"] = null;
  if (slot?.active && slot.activePid !== null) {
    // The walsender's own application_name is the slot's; the process behind it is the sync (or the
    // holder, a backfill or verify or cutover that follows the stream itself).
    const syncs = await sql`
      select pid from pg_catalog.pg_stat_activity
       where datname = current_database() and application_name = ${`pgshift sync ${displayName(table)}`} order by
         backend_start limit 1`;
    const by = syncs[0] ? await session(sql, Number(syncs[0].pid)) : (holder ?? (await session(sql, slot.activePid)));
    streamConsumer = { ...by, walsenderPid: slot.activePid };
  }
  const inCopy = m.phase === "started" || m.phase === "backfilling";
  return {
    holder,
    backfillRunning: holder !== null && inCopy && (holder.command === null || holder.command === "backfill"),
    streamConsumer,
    lastBatchAt:
      m.phase === "backfilling"
        ? m.updated_at.toISOString()
        : ((m.copy_finished_at ?? m.backfill_finished_at)?.toISOString() ?? null),
    lastAppliedCommitAt: m.applied_commit_time?.toISOString() ?? null,
    lastStateChangeAt: m.updated_at.toISOString(),
  };
}

/**
 * The next step a person should take, from the phase, who is working on the migration now (`live`), the
 * last verify and, in logical mode, whether anything streams the slot. Commands are spelled out with
 * the table's name.
 */
export function nextStepFor(m: Migration, table: QualifiedName, live: Liveness): string {
  const t = displayName(table);
  const h = live.holder;
  const who = (s: SessionInfo) =>
    `${s.command ? `pgshift ${s.command}` : (s.applicationName ?? "a pgshift process")} (backend ` +
    `pid ${s.pid}${s.since ? `, since ${s.since}` : ""})`;
  if (live.backfillRunning && h) return `wait: ${who(h)} is copying; watch it with: watch -n 5 pgshift status ${t}`;
  if (h) return `wait: ${who(h)} is working on ${t}; run pgshift status ${t} again when it is done`;
  const v = m.last_verify;
  const differs = v !== null && !v.equal;
  const streams = m.mode === "logical" && m.slot_name !== null;
  const noConsumer = streams && live.streamConsumer === null;
  switch (m.phase) {
    case "started":
      return `run pgshift backfill ${t}`;
    case "backfilling":
      return m.copy_finished_at
        ? `no backfill is running: the copy is complete but not all secondary indexes are built; run pgshift ` +
            `backfill ${t} to finish them`
        : `no backfill is running (it stopped or was ` +
            `killed${live.lastBatchAt ? `; last batch at ${live.lastBatchAt}` : ""}): run pgshift backfill ${t} to ` +
            `resume from its checkpoint (${m.rows_copied} rows copied)`;
    case "backfilled": {
      const step = differs
        ? `the last verify found differences: run pgshift verify ${t} --repair, then pgshift cutover ${t}`
        : `run pgshift verify ${t}, then pgshift cutover ${t}`;
      return noConsumer
        ? `${step}; meanwhile run pgshift sync ${t} (nothing streams the replication slot now: WAL piles up ` +
            `until something does)`
        : step;
    }
    case "cutover":
      return differs
        ? `the last verify found differences: run pgshift verify ${t} --repair, then pgshift finalize ${t} --yes (or ` +
            `pgshift swap-back ${t})`
        : `run pgshift verify ${t}, then pgshift finalize ${t} --yes (or pgshift swap-back ${t})`;
    case "swapped_back":
      return `run pgshift cutover ${t} again, or pgshift abort ${t}`;
  }
}
