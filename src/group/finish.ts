import type { LockRetryOptions, Sql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { abort, abortPlan, type FinishOptions, type FinishResult, finalize } from "../migration/finish.js";
import { displayName, type QualifiedName } from "../names.js";
import { statementsOf } from "../plan/steps.js";
import { requireGroup } from "./members.js";

/** What a group's finalize or abort did, table by table in the order it went. */
export interface GroupFinishResult {
  tables: { table: string; result: FinishResult }[];
}

/**
 * Finalizes or aborts every table of group `group`, referencing tables first (the reverse of loadGroup's order): a
 * retired table (or shadow) that another of the group references can be dropped only once that one is. Each table
 * is its own transaction (finalize, abort), so a failure after the first names the tables done and the command to
 * run again, which goes on with the rest (docs/groups.md).
 * @throws PgshiftError, PhaseError as finalize or abort.
 */
export async function finishGroup(
  sql: Sql,
  group: string,
  command: "finalize" | "abort",
  opts: FinishOptions & LockRetryOptions = {},
): Promise<GroupFinishResult> {
  const members = [...(await requireGroup(sql, group, command, { upgrade: !opts.dryRun }))].reverse();
  const out: GroupFinishResult = { tables: [] };
  if (command === "finalize") {
    if (!opts.yes && !opts.dryRun)
      throw new PgshiftError(
        `finalize drops the retired tables of group ${group} (${members.map((m) => displayName(m.copy)).join(", ")}) ` +
          "and makes swap-back impossible",
        { hint: "run it again with --yes to confirm" },
      );
  }
  const droppedBefore: QualifiedName[] = [];
  for (const m of members) {
    try {
      const r =
        command === "finalize"
          ? await finalize(sql, m.live, { ...opts, group, droppedBefore: [...droppedBefore] })
          : opts.dryRun
            ? await abortPlan(sql, m.live, { ...opts, dryRun: true, group }).then((p) => ({
                steps: p.steps,
                statements: statementsOf(p.steps),
              }))
            : await abort(sql, m.live, { ...opts, group });
      out.tables.push({ table: displayName(m.live), result: r });
      droppedBefore.push(m.copy);
    } catch (err) {
      if (out.tables.length === 0 || opts.dryRun) throw err;
      throw new PgshiftError(
        `${command} of group ${group} stopped at ${displayName(m.live)} (done: ${out.tables
          .map((t) => t.table)
          .join(", ")}): ${err instanceof Error ? err.message : String(err)}`,
        { hint: `fix it, then run pgshift ${command} --group ${group} again`, cause: err },
      );
    }
  }
  return out;
}
