import type { Sql } from "../db.js";
import { BlockedError, PgshiftError } from "../errors.js";
import { log } from "../log.js";
import { abort } from "../migration/finish.js";
import { type MigrationPlan, planMigration } from "../migration/plan.js";
import { keyExtensionRefusal, type StartOptions, type StartResult, startMigration } from "../migration/start.js";
import { displayName, type QualifiedName } from "../names.js";
import { foreignKeysBetween, loadGroup, referencedFirst } from "./members.js";

/** What startGroup started, referenced tables first. */
export interface GroupStartResult {
  group: string;
  started: StartResult[];
}

/** The plan of each table of a group start (what --dry-run prints), referenced tables first, and their blockers. */
export interface GroupStartPlan {
  group: string;
  plans: MigrationPlan[];
  /** Every blocker of every table, each prefixed with its table; empty when the group can start. */
  blockers: string[];
}

/**
 * Plans the start of `tables` as migration group `group` (docs/groups.md), changing nothing: each table's plan
 * (planMigration, all of start's checks) with the group recorded and the foreign keys between the tables left off
 * the shadows (the group's backfill adds them), referenced tables first. Blockers of the group itself: a group of
 * that name in progress already, logical mode (each table's stream is applied on its own, not in the
 * application's order, so a foreign key between the shadows would refuse rows and a group's cutover could not catch
 * every stream up under one lock), a table named twice.
 * @throws PgshiftError when a table does not exist, or the foreign keys between the tables form a cycle.
 */
export async function planGroupStart(
  sql: Sql,
  group: string,
  tables: readonly QualifiedName[],
  opts: StartOptions,
): Promise<GroupStartPlan> {
  const blockers: string[] = [];
  const names = new Set(tables.map(displayName));
  if (names.size !== tables.length) blockers.push("a table is named more than once");
  if ((await loadGroup(sql, group, { upgrade: false })).length > 0)
    blockers.push(`migration group ${group} is in progress already (a group is started at once; see pgshift status)`);
  if ((opts.mode ?? "trigger") === "logical")
    blockers.push(
      "a migration group runs in trigger mode only: in logical mode each table's changes are applied by its own " +
        "stream, not in the application's order, so foreign keys between the shadows would refuse rows, and one " +
        "transaction cannot catch every stream up under its lock (use --mode trigger)",
    );
  const fks = await foreignKeysBetween(sql, tables);
  const ordered = referencedFirst(tables, (t) => t, fks);
  const plans: MigrationPlan[] = [];
  for (const t of ordered) {
    const own = fks.filter((f) => f.from.schema === t.schema && f.from.name === t.name).map((f) => f.name);
    const plan = await planMigration(sql, t, { ...opts, group: { name: group, foreignKeys: own } });
    plans.push(plan);
    const refusal = opts.allowKeyExtension ? null : keyExtensionRefusal(plan);
    blockers.push(
      ...plan.blockers.map((b) => `${displayName(t)}: ${b}`),
      ...(refusal ? [`${displayName(t)}: ${refusal.message} (${refusal.hint ?? ""})`] : []),
    );
  }
  return { group, plans, blockers };
}

/**
 * Starts `tables` as migration group `group`: checks every table first (planGroupStart: every blocker of every
 * table, nothing changed), then starts each, referenced tables first (startMigration: one transaction each). If one
 * fails, those already started are aborted again, in reverse order (abort: shadow, mirror and row dropped), so that
 * a failed group start leaves nothing behind; the error names the table and what was undone.
 * @throws BlockedError listing the blockers of every table (nothing changed); PgshiftError when a start failed (and
 *   what it had started was undone), or when undoing failed too (naming what is left, with the command to run).
 */
export async function startGroup(
  sql: Sql,
  group: string,
  tables: readonly QualifiedName[],
  opts: StartOptions,
  hooks: { afterStart?: (table: QualifiedName) => Promise<void> } = {},
): Promise<GroupStartResult> {
  const plan = await planGroupStart(sql, group, tables, opts);
  if (plan.blockers.length > 0) throw new BlockedError(`migration group ${group}`, plan.blockers);
  const started: StartResult[] = [];
  for (const p of plan.plans) {
    const own = (await foreignKeysBetween(sql, tables))
      .filter((f) => f.from.schema === p.source.schema && f.from.name === p.source.name)
      .map((f) => f.name);
    try {
      started.push(await startMigration(sql, p.source, { ...opts, group: { name: group, foreignKeys: own } }));
      await hooks.afterStart?.(p.source);
    } catch (err) {
      const undone: string[] = [];
      const left: string[] = [];
      for (const s of [...started].reverse()) {
        try {
          await abort(sql, s.plan.source, { ...opts, group });
          undone.push(displayName(s.plan.source));
        } catch (e) {
          left.push(displayName(s.plan.source));
          log().error({ table: displayName(s.plan.source), err: String(e) }, "group start: could not undo the start");
        }
      }
      const why = err instanceof Error ? err.message : String(err);
      throw new PgshiftError(
        `migration group ${group} was not started: starting ${displayName(p.source)} failed: ${why}` +
          (undone.length > 0 ? `; undone: ${undone.join(", ")}` : "") +
          (left.length > 0 ? `; NOT undone: ${left.join(", ")}` : ""),
        {
          hint:
            left.length > 0
              ? `run pgshift abort --group ${group}, then start again`
              : `${err instanceof PgshiftError && err.hint ? `${err.hint}; ` : ""}nothing is left: start again`,
          cause: err,
        },
      );
    }
  }
  log().info({ group, tables: started.map((s) => displayName(s.plan.source)) }, "migration group started");
  return { group, started };
}
