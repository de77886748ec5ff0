/**
 * Cutover and swap-back of a migration group (docs/groups.md): every table of the group switches in ONE
 * transaction, so the application never sees one table switched and another not. The transaction locks every
 * table of the group, live and copy, with one LOCK TABLE naming them in one fixed order (lockOrder: referenced
 * tables first, each live table before its copy); then, table by table
 * (referenced tables first), the checks, the renames, the mirror turned round, the dependents carried over and
 * the phase recorded, as a single table's switch does (src/cutover/cutover.ts). Foreign keys between the group's
 * tables are not carried: they follow their tables through the renames (src/group/foreign-keys.ts).
 */
import { dependencySnapshot, requireNoDrift } from "../catalog/drift.js";
import { carryOverPlan, carryOverSteps, nothingToCarry, runCarryOver } from "../cutover/carry-over.js";
import {
  type BuiltIndex,
  type CutoverOptions,
  lateCheck,
  phaseSql,
  requireNoKnownDifferences,
  runCarriedAfter,
  runSwitchTransaction,
  type SwitchOptions,
  switchOptions,
  switchSql,
} from "../cutover/cutover.js";
import type { Sql } from "../db.js";
import { type Carried, carryDependents } from "../dependents/index.js";
import { PgshiftError } from "../errors.js";
import { emit } from "../events.js";
import { LockSite } from "../locks/holders.js";
import { log } from "../log.js";
import { loadMigration, lockMigration, type Migration, unlockMigration } from "../migration/state.js";
import { mirrorFor } from "../mirror/mirror.js";
import { displayName, type QualifiedName, quoteQualified } from "../names.js";
import {
  check,
  formatSteps,
  type Step,
  statement,
  statementsOf,
  type TransactionStep,
  transactionStep,
} from "../plan/steps.js";
import { shadowForeignKeySteps } from "./foreign-keys.js";
import { requireGroup } from "./members.js";

type SwitchCommand = "cutover" | "swap-back";

/** One table's part of a group's switch. */
interface MemberSwitch {
  /** The migration as the transaction reads it (index renames of the carry-over recorded). */
  migration: Migration;
  table: QualifiedName;
  carried: Carried[];
  /** The live table's dependents before the lock (dependencySnapshot), compared under it. */
  snapshot: string[];
}

/** A group's switch, as --dry-run prints it and the command runs it. */
export interface GroupSwitchPlan {
  group: string;
  command: SwitchCommand;
  members: MemberSwitch[];
  /** Indexes created on a live table meanwhile, built on its copy before the lock (every table's, in order). */
  carryOver: Step[];
  /** The one transaction: the lock on every table, then every table's checks, renames, mirror, phase. */
  transaction: TransactionStep;
  lockSite: LockSite;
  /** After COMMIT: what carried dependents still need (a foreign key validated, a materialized view rebuilt). */
  after: Step[];
  /** performance.now() when the lock on every table was granted. */
  locked: { at: number };
}

/** The steps of the plan, in order. */
export const groupSwitchSteps = (p: GroupSwitchPlan): Step[] => [...p.carryOver, p.transaction, ...p.after];

/** What `cutover --group --dry-run` and `swap-back --group --dry-run` print. */
export const formatGroupSwitchPlan = (p: GroupSwitchPlan): string => formatSteps(groupSwitchSteps(p));

/**
 * The tables a group's switch locks, in the order it locks them: table by table in the group's order (referenced
 * tables first, then by schema-qualified name: loadGroup), each table's live table, then its copy. It is the order
 * in which an application writes them (an order, then its items; a DELETE of an order cascades to its items), so
 * the switch's lock requests never wait in a cycle with the application's own; and every group switch takes them
 * in this one order.
 */
export function lockOrder(members: readonly Pick<Migration, "live" | "copy">[]): QualifiedName[] {
  return members.flatMap((m) => [m.live, m.copy]);
}

function buildGroupSwitch(group: string, command: SwitchCommand, members: MemberSwitch[], o: SwitchOptions) {
  const to = command === "cutover" ? "cutover" : "swapped_back";
  const order = lockOrder(members.map((x) => x.migration));
  const locked = { at: 0 };
  const site = new LockSite(
    order.map((table) => ({ table, mode: "ACCESS EXCLUSIVE" as const })),
    { table: `group ${group}`, command, lockTimeoutMs: o.lockTimeoutMs, terminateAfterMs: o.terminateAfterMs },
  );
  const lock = statement(
    `LOCK TABLE ${order.map(quoteQualified).join(", ")} IN ACCESS EXCLUSIVE MODE`,
    "transaction",
    "every table of the group, live and copy, referenced tables first (lockOrder)",
  );
  lock.read = () => {
    locked.at = performance.now();
  };
  const rerun = `pgshift ${command} --group ${group}`;
  const steps: Step[] = [
    ...members.map((x) =>
      check(
        `refuse if the migration of ${displayName(x.table)} left phase ${x.migration.phase} meanwhile`,
        async (tx) => {
          const now = await loadMigration(tx, x.table, { upgrade: false });
          if (now?.phase !== x.migration.phase || now.group_name !== group)
            throw new PgshiftError(`the migration of ${displayName(x.table)} changed meanwhile`, {
              hint: `run ${rerun} again`,
            });
        },
      ),
    ),
    ...site.steps(lock),
  ];
  for (const x of members) {
    const m = x.migration;
    steps.push(
      lateCheck(m, x.table, command, () => x.snapshot, rerun),
      // The first statement locks this table's two: done above, for every table at once.
      ...switchSql(m, to)
        .slice(1)
        .map((s) => statement(s)),
      ...x.carried.flatMap((c) => c.inside),
      statement(phaseSql(m, to)),
    );
  }
  return {
    transaction: transactionStep(steps, {
      lockTimeoutMs: o.lockTimeoutMs,
      why: `every table of group ${group} switches, or none`,
    }),
    site,
    locked,
  };
}

/**
 * Builds the plan of a group's cutover or swap-back (GroupSwitchPlan), refusing first, changing nothing, as a single
 * table's switchPlan does, for any table of the group: a phase that does not allow the command, an unhealthy mirror,
 * changed columns, differences found by the last verify, objects created on a live table that no carrier moves; and
 * a table of the group in logical mode (a group runs in trigger mode: src/group/start.ts).
 * @param opts as for cutover; `dryRun`: read an older pgshift schema as it is.
 * @throws PhaseError, PgshiftError as above.
 */
export async function groupSwitchPlan(
  sql: Sql,
  group: string,
  command: SwitchCommand,
  opts: CutoverOptions & { dryRun?: boolean } = {},
): Promise<GroupSwitchPlan> {
  const ms = await requireGroup(sql, group, command, { upgrade: !opts.dryRun });
  const what = command === "cutover" ? "cut over" : "swap back";
  const o = switchOptions(opts);
  // The foreign keys between the shadows are added by the group's backfill once every table is copied: without
  // them the new live tables would not reference each other.
  const missing = command === "cutover" ? await shadowForeignKeySteps(sql, group, ms, opts) : [];
  if (missing.length > 0)
    throw new PgshiftError(
      `cannot cut over group ${group}: the foreign keys between its tables are not on the shadows (or not ` +
        "validated) yet",
      { hint: `run pgshift backfill --group ${group} (it adds them once every table is copied), then again` },
    );
  const members: MemberSwitch[] = [];
  const carryOver: Step[] = [];
  for (const m0 of ms) {
    const table = m0.live;
    if (m0.mode !== "trigger")
      throw new PgshiftError(`cannot ${what} group ${group}: ${displayName(table)} is in ${m0.mode} mode`, {
        hint: "a migration group runs in trigger mode only (docs/groups.md); abort it and start it again",
      });
    const health = await mirrorFor(m0.mode).health(sql, m0);
    if (!health.ok)
      throw new PgshiftError(`the mirror of ${displayName(table)} is not healthy: ${health.detail}`, {
        hint: "run pgshift verify --repair after fixing it, or pgshift abort --group",
      });
    await requireNoDrift(sql, m0, what);
    requireNoKnownDifferences(m0, what);
    const snapshot = await dependencySnapshot(sql, table);
    const c = await carryOverPlan(sql, m0, table, o.lockTimeoutMs);
    carryOver.push(...carryOverSteps(c));
    const carried = await carryDependents(sql, c.migration, command === "cutover" ? "cutover" : "swapped_back");
    members.push({ migration: c.migration, table, carried, snapshot });
  }
  const b = buildGroupSwitch(group, command, members, o);
  return {
    group,
    command,
    members,
    carryOver,
    transaction: b.transaction,
    lockSite: b.site,
    after: members.flatMap((x) => x.carried.flatMap((c) => c.after)),
    locked: b.locked,
  };
}

/** What a group's switch did. */
export interface GroupSwitchResult {
  /** From the moment the lock on every table was granted to COMMIT: how long writes were blocked, ms. */
  lockHeldMs: number;
  attempts: number;
  /** The tables switched (original names), in the order the transaction switched them. */
  tables: string[];
  /** Every statement that ran, in order. */
  statements: string[];
  indexesBuilt: BuiltIndex[];
}

/**
 * Runs a group's cutover or swap-back (groupSwitchPlan's plan): the advisory lock of every table's migration (in
 * the group's order), the carry-over of late indexes (then the plan is built again; refused if more keep coming),
 * the one transaction under lock_timeout with jittered retries, then what carried dependents need after COMMIT (a
 * failure there is logged with its statements, as for one table).
 * @throws PgshiftError / PhaseError as groupSwitchPlan; PgshiftError when the locks are never granted in time
 *   (nothing switched).
 */
export async function switchGroup(
  sql: Sql,
  group: string,
  command: SwitchCommand,
  opts: CutoverOptions = {},
): Promise<GroupSwitchResult> {
  const first = await requireGroup(sql, group, command);
  const tables = first.map((m) => m.live);
  const held: QualifiedName[] = [];
  try {
    for (const t of tables) {
      await lockMigration(sql, t);
      held.push(t);
    }
    let plan = await groupSwitchPlan(sql, group, command, opts);
    const built: BuiltIndex[] = [];
    const statements: string[] = [];
    if (plan.carryOver.length > 0) {
      for (const x of plan.members) {
        const c = await carryOverPlan(sql, x.migration, x.table, switchOptions(opts).lockTimeoutMs);
        if (nothingToCarry(c)) continue;
        built.push(...(await runCarryOver(sql, c, x.table, opts.retries)));
        statements.push(...statementsOf(carryOverSteps(c)));
      }
      plan = await groupSwitchPlan(sql, group, command, opts);
      if (plan.carryOver.length > 0)
        throw new PgshiftError(
          `cannot ${command === "cutover" ? "cut over" : "swap back"} group ${group}: indexes kept being created ` +
            "while pgshift built their counterparts; nothing was switched",
          { hint: `run pgshift ${command} --group ${group} again once no more are being created` },
        );
    }
    await opts.beforeLock?.();
    const attempts = { made: 0 };
    const tx = plan.transaction;
    await runSwitchTransaction(sql, tx, plan.lockSite, opts, attempts, {
      fields: { group },
      retrying: `${command} --group: lock not granted in time or a session holds it, locks released, retrying`,
    });
    const lockHeldMs = performance.now() - plan.locked.at;
    statements.push(...statementsOf([tx]));
    for (const x of plan.members)
      statements.push(...(await runCarriedAfter(sql, x.carried, command, { group }, opts.retries)));
    const to = command === "cutover" ? "cutover" : "swapped_back";
    for (const x of plan.members) {
      emit("blocked", { table: displayName(x.table), command, ms: lockHeldMs });
      emit("phase", { table: displayName(x.table), command, from: x.migration.phase, to });
    }
    log().info(
      { group, tables: plan.members.map((x) => displayName(x.table)), lockHeldMs: Math.round(lockHeldMs * 10) / 10 },
      `${command} of group done`,
    );
    return {
      lockHeldMs,
      attempts: attempts.made,
      tables: plan.members.map((x) => displayName(x.table)),
      statements,
      indexesBuilt: built,
    };
  } finally {
    for (const t of held.reverse()) await unlockMigration(sql, t).catch(() => {});
  }
}
