/**
 * Dependent objects that follow the live table: the views, triggers, row-level security policies, foreign keys
 * of other tables and publications that depend on the table the application uses. A carrier moves one kind of
 * them at every switch (cutover, swap-back, a later cutover), inside the switch's transaction, after the renames:
 * then the original name already belongs to the table that becomes live, so a definition read before the switch
 * (which names the table by that name) re-created then resolves to the new live table. Work that would hold the
 * lock too long (validating a foreign key, rebuilding a materialized view) is an `after` step, run after COMMIT
 * without blocking writes.
 */
import type { TableFacts } from "../catalog/inspect.js";
import type { AnySql } from "../db.js";
import { PgshiftError } from "../errors.js";
import type { Migration } from "../migration/state.js";
import { displayName, type QualifiedName, quoteQualified } from "../names.js";
import type { PartitionSpec } from "../partitioning/spec.js";
import type { Step } from "../plan/steps.js";

/** What `plan` says about one kind of dependent object of the table. */
export interface CarrierPlan {
  /** One line per object: what happens to it at cutover, swap-back and finalize. */
  lines: string[];
  /** Objects that cannot follow the table, each naming the object, why, and what would allow it. */
  blockers: string[];
}

/** One object a switch carries over. */
export interface Carried {
  /** What it is, for the plan's comments and the log: `view public.v`, `trigger audit on public.orders`. */
  label: string;
  /** Statements inside the switch's transaction, after the renames (the new live table has the original name). */
  inside: Step[];
  /** Steps after the switch's COMMIT, that do not block writes (VALIDATE CONSTRAINT, a rebuild). */
  after: Step[];
}

/** The switch a carrier prepares: `cutover` makes the partitioned table live, `swapped_back` the original. */
export type SwitchTo = "cutover" | "swapped_back";

/** One kind of dependent object. */
export interface Carrier {
  /** The kind, plural, for messages: `views`. */
  kind: string;
  /**
   * At `plan` and `start`: what happens to each object of this kind depending on the table, and what cannot
   * follow it (a blocker). Reads the catalog only.
   */
  plan(sql: AnySql, facts: TableFacts, spec: PartitionSpec): Promise<CarrierPlan>;
  /**
   * The objects on `live` this carrier moves at a switch, as pg_depend keys `<catalog>/<oid>` (the catalog's
   * name, e.g. `pg_rewrite/16423`): the late-object check (catalog/drift.ts) does not refuse them.
   */
  claims(sql: AnySql, live: QualifiedName): Promise<string[]>;
  /**
   * What the switch of `m` (phase as now: the live table is `m.live`, the copy `m.copy`) to `to` carries over,
   * read from the catalog now. Reads only.
   */
  carry(sql: AnySql, m: Migration, to: SwitchTo): Promise<Carried[]>;
}

/**
 * Runs the catalog reads of `fn` that give definitions (pg_get_viewdef, pg_get_triggerdef, pg_get_constraintdef,
 * pg_get_expr, pg_get_functiondef). These qualify a name with its schema unless the session's search_path finds it
 * (PostgreSQL's ruleutils), so a definition read here names the table as this session finds it, and re-created
 * by pgshift (on a connection with the same settings) resolves the same way: after the renames, to the table
 * becoming live. No setting is changed, so a `--dry-run` sends only reads.
 */
export async function withQualifiedNames<T>(sql: AnySql, fn: (sql: AnySql) => Promise<T>): Promise<T> {
  return fn(sql);
}

/**
 * The oid of table `t`.
 * @throws PgshiftError when it does not exist.
 */
export async function oidOf(sql: AnySql, t: QualifiedName): Promise<number> {
  const r = await sql`select pg_catalog.to_regclass(${quoteQualified(t)})::oid::int8 as oid`;
  const oid = r[0]?.oid;
  if (oid === null || oid === undefined) throw new PgshiftError(`${displayName(t)} does not exist`);
  return Number(oid);
}
