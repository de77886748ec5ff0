import { type BackfillOptions, type BackfillResult, backfill, describeBackfill } from "../backfill/backfill.js";
import type { Sql } from "../db.js";
import { runLocked } from "../locks/holders.js";
import { log } from "../log.js";
import { formatSteps, type Step } from "../plan/steps.js";
import { shadowForeignKeySteps } from "./foreign-keys.js";
import { requireGroup } from "./members.js";

/** What a group's backfill did: each table's backfill, in order, and the foreign-key steps that ran after them. */
export interface GroupBackfillResult {
  tables: { table: string; result: BackfillResult }[];
  /** Whether every table is copied (false when a backfill stopped early: its checkpoint is kept). */
  complete: boolean;
  /** The steps that added the group's foreign keys to the shadows (empty when there were none to add). */
  foreignKeys: Step[];
}

/**
 * Backfills every table of group `group` (backfill, each with `opts`), referenced tables first; once every table is
 * copied, adds the foreign keys between the tables to their shadows (shadowForeignKeySteps). Re-runnable: a table
 * already copied does nothing, a foreign key already added is not added again.
 * @throws PgshiftError / PhaseError as backfill, for the first table that fails (the others keep their checkpoints).
 */
export async function backfillGroup(sql: Sql, group: string, opts: BackfillOptions = {}): Promise<GroupBackfillResult> {
  const members = await requireGroup(sql, group, "backfill");
  const tables: GroupBackfillResult["tables"] = [];
  for (const m of members)
    tables.push({ table: `${m.live.schema}.${m.live.name}`, result: await backfill(sql, m.live, opts) });
  const complete = tables.every((t) => t.result.complete);
  if (!complete) return { tables, complete, foreignKeys: [] };
  const steps = await shadowForeignKeySteps(sql, group, await requireGroup(sql, group, "backfill"), opts);
  if (steps.length > 0) {
    await runLocked(sql, steps, { lockRetry: opts.retries !== undefined ? { retries: opts.retries } : {} });
    log().info({ group, statements: steps.length }, "group backfill: foreign keys between the shadows added");
  }
  return { tables, complete, foreignKeys: steps };
}

/**
 * What backfill --group would run now, as --dry-run prints it: each table's backfill plan (describeBackfill), in
 * order, then the foreign keys it would add to the shadows once every table is copied (as they are read now).
 * Changes nothing.
 */
export async function describeGroupBackfill(sql: Sql, group: string, opts: BackfillOptions = {}): Promise<string> {
  const members = await requireGroup(sql, group, "backfill", { upgrade: false });
  const parts: string[] = [];
  for (const m of members)
    parts.push(`-- ${m.live.schema}.${m.live.name}\n${await describeBackfill(sql, m.live, opts)}`);
  const fks = await shadowForeignKeySteps(sql, group, members, opts);
  if (fks.length > 0)
    parts.push(`-- once every table is copied: the foreign keys between the shadows\n${formatSteps(fks)}`);
  return parts.join("");
}
