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
import { type AnySql, transaction } from "../db.js";
import type { Migration } from "../migration/state.js";
import type { QualifiedName } from "../names.js";
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

/** Thrown out of a savepoint to roll it back (and with it the search_path set in it) after a read. */
class ReadDone<T> extends Error {
  constructor(readonly value: T) {
    super("read done");
  }
}

/**
 * Runs the catalog reads of `fn` with `search_path = pg_catalog`, so that pg_get_viewdef, pg_get_triggerdef,
 * pg_get_constraintdef, pg_get_expr and pg_get_functiondef schema-qualify every name outside pg_catalog: a
 * definition read so names the table by its schema and name, and means the same wherever it runs again. The
 * setting is local to a transaction of its own (or to a savepoint rolled back after the read, when `sql` is
 * already in a transaction), so no session keeps it.
 */
export async function withQualifiedNames<T>(sql: AnySql, fn: (sql: AnySql) => Promise<T>): Promise<T> {
  const pin = async (s: AnySql) => {
    await s`select pg_catalog.set_config('search_path', 'pg_catalog', true)`;
    return fn(s);
  };
  if ("savepoint" in sql) {
    try {
      await sql.savepoint(async (sp) => {
        throw new ReadDone(await pin(sp));
      });
    } catch (err) {
      if (err instanceof ReadDone) return err.value as T;
      throw err;
    }
    throw new Error("withQualifiedNames: the savepoint returned");
  }
  return transaction(sql, pin);
}
