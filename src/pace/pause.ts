import { z } from "zod";
import type { AnySql } from "../db.js";
import { emit } from "../events.js";
import { log } from "../log.js";
import { requireMigration } from "../migration/state.js";
import { displayName, type QualifiedName } from "../names.js";

/** The pause state of a migration, as pause and resume report it. */
export interface PauseState {
  table: string;
  /** Whether the migration is paused now (after the command). */
  paused: boolean;
  /** Whether the command changed anything (false: it was already paused, or already not paused). */
  changed: boolean;
  /** Who paused it (current_user of the pausing session), from where (application_name, client address). */
  by: string | null;
  client: string | null;
  /** Since when (ISO 8601), null when not paused. */
  since: string | null;
}

const Row = z.object({
  paused_at: z.date().nullable(),
  paused_by: z.string().nullable(),
  paused_client: z.string().nullable(),
  changed: z.boolean(),
});

/**
 * The statements of pause and resume, as sent; `$1` the migration's id. Each changes the row only when its state
 * differs (a second pause keeps who paused first and since when) and returns the state after it, `changed` telling
 * whether it was this statement that changed it. They leave updated_at alone: status reads it as the time of the
 * last batch (liveness.ts).
 */
export const PAUSE_SQL = {
  pause:
    "WITH me AS (SELECT nullif(application_name, '') AS app, host(client_addr) AS host " +
    "FROM pg_catalog.pg_stat_activity WHERE pid = pg_backend_pid()), " +
    "upd AS (UPDATE pgshift.migrations SET paused_at = now(), paused_by = current_user, " +
    "paused_client = (SELECT concat_ws(' from ', coalesce(app, 'no application_name'), " +
    "coalesce(host, 'a local socket')) FROM me) " +
    "WHERE id = $1 AND paused_at IS NULL RETURNING paused_at, paused_by, paused_client) " +
    "SELECT paused_at, paused_by, paused_client, true AS changed FROM upd UNION ALL " +
    "SELECT paused_at, paused_by, paused_client, false FROM pgshift.migrations WHERE id = $1 AND NOT EXISTS " +
    "(SELECT FROM upd)",
  resume:
    "WITH upd AS (UPDATE pgshift.migrations SET paused_at = NULL, paused_by = NULL, paused_client = NULL " +
    "WHERE id = $1 AND paused_at IS NOT NULL RETURNING id) " +
    "SELECT NULL::timestamptz AS paused_at, NULL::text AS paused_by, NULL::text AS paused_client, " +
    "EXISTS (SELECT FROM upd) AS changed",
} as const;

async function setPaused(sql: AnySql, table: QualifiedName, pause: boolean): Promise<PauseState> {
  const m = await requireMigration(sql, table, pause ? "pause" : "resume");
  const r = Row.parse((await sql.unsafe(pause ? PAUSE_SQL.pause : PAUSE_SQL.resume, [m.id]))[0]);
  const state: PauseState = {
    table: displayName(table),
    paused: r.paused_at !== null,
    changed: r.changed,
    by: r.paused_by,
    client: r.paused_client,
    since: r.paused_at?.toISOString() ?? null,
  };
  if (r.changed) {
    emit("paused", { table: state.table, paused: state.paused, by: state.by, since: state.since });
    log().info({ table: state.table, by: state.by, client: state.client }, pause ? "paused" : "resumed");
  }
  return state;
}

/**
 * Pauses the copy and the verify of the migration of `table`: kept in pgshift.migrations (paused_at, paused_by:
 * current_user, paused_client: the session's application_name and client address), so that a backfill or verify
 * running in any process stops before its next batch or chunk (its checkpoint is saved with each batch) and one
 * started later waits before its first. Takes no lock but the row's (a batch's checkpoint holds it for at most
 * one batch). Already paused: changes nothing (`changed` false; who paused first is kept).
 * The logical applier is not paused (it would leave the slot retaining WAL).
 * @throws PgshiftError when no migration of `table` exists.
 */
export function pause(sql: AnySql, table: QualifiedName): Promise<PauseState> {
  return setPaused(sql, table, true);
}

/**
 * Resumes the copy and the verify of the migration of `table` (see pause): a waiting backfill or verify goes on
 * within its check interval (500 ms). Not paused: changes nothing (`changed` false).
 * @throws PgshiftError when no migration of `table` exists.
 */
export function resume(sql: AnySql, table: QualifiedName): Promise<PauseState> {
  return setPaused(sql, table, false);
}
