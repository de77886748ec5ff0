/**
 * The foreign keys between the tables of a migration group, on their shadows (docs/groups.md). start leaves them off
 * the shadow (ShadowNames.withoutForeignKeys): while the copies run, a mirrored write of a referencing row (an
 * update of an old order item) would find its referenced row not copied yet, and fail in the application's
 * transaction. Once every table of the group is copied, the group's backfill adds each one to the referencing
 * table's shadow, referencing the referenced table's shadow. From then on the constraints follow their tables
 * through the renames (a constraint names tables by OID): after the group's cutover the new live tables reference
 * each other and the retired ones each other, and swap-back turns it back. The mirror writes the shadows in the
 * application's order, inside its transaction, so the foreign key holds there as it holds on the live tables.
 */
import { z } from "zod";
import { type AnySql, DEFAULT_LOCK_TIMEOUT_MS } from "../db.js";
import { doBlock } from "../ddl/shadow.js";
import { LockSite, lockedTransaction } from "../locks/holders.js";
import { partitionedIsLive } from "../migration/phases.js";
import type { Migration } from "../migration/state.js";
import { displayName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "../names.js";
import { type Step, statement } from "../plan/steps.js";
import { foreignKeysBetween } from "./members.js";

const DefRow = z.object({
  def: z.string(),
  ref: z.string(),
  present: z.boolean(),
  validated: z.boolean(),
  version: z.coerce.number(),
});

/**
 * The steps that add the group's foreign keys missing from the shadows (none once they are all there, or after
 * cutover): for each, one transaction locking both shadows (SHARE ROW EXCLUSIVE, what ADD FOREIGN KEY takes on both:
 * the mirror's writes, so the application's, wait meanwhile; under lock_timeout, looked at first: LockSite) that
 * adds it. PostgreSQL 18 adds it NOT VALID (no scan) and validates it after COMMIT without blocking writes (SHARE
 * UPDATE EXCLUSIVE); before 18 a partitioned table cannot take a NOT VALID foreign key (ALTER TABLE, ADD
 * table_constraint: "NOT VALID ... not supported for foreign keys on partitioned tables" until 18), so it goes on
 * through the leaf partitions (NOT VALID, then VALIDATE, then the ADD on the shadow attaches them without a scan:
 * leafForeignKeySteps).
 * @param members the group's migrations, referenced first (loadGroup).
 */
export async function shadowForeignKeySteps(
  sql: AnySql,
  group: string,
  members: readonly Migration[],
  opts: { lockTimeoutMs?: number; terminateHoldersAfterMs?: number | null } = {},
): Promise<Step[]> {
  const lockTimeoutMs = opts.lockTimeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS;
  const byLive = (q: { schema: string; name: string }) =>
    members.find((m) => m.live.schema === q.schema && m.live.name === q.name);
  const out: Step[] = [];
  for (const fk of await foreignKeysBetween(
    sql,
    members.map((m) => m.live),
  )) {
    const from = byLive(fk.from);
    const to = byLive(fk.to);
    if (!from || !to || partitionedIsLive(from.phase) || partitionedIsLive(to.phase)) continue;
    const rows = await sql`
      select pg_catalog.pg_get_constraintdef(c.oid) as def, c.confrelid::regclass::text as ref,
             exists (select from pg_catalog.pg_constraint s where s.conrelid = to_regclass(${quoteQualified(from.copy)})
                        and s.conname = c.conname and s.contype = 'f') as present,
             exists (select from pg_catalog.pg_constraint s where s.conrelid = to_regclass(${quoteQualified(from.copy)})
                        and s.conname = c.conname and s.contype = 'f' and s.convalidated) as validated,
             current_setting('server_version_num')::int as version
        from pg_catalog.pg_constraint c
       where c.conrelid = to_regclass(${quoteQualified(from.live)}) and c.conname = ${fk.name} and c.contype = 'f'`;
    const r = DefRow.parse(rows[0]);
    const shadow = quoteQualified(from.copy);
    const name = quoteIdent(fk.name);
    const validate = statement(
      `ALTER TABLE ${shadow} VALIDATE CONSTRAINT ${name}`,
      "session",
      "checks the copied rows without blocking writes (SHARE UPDATE EXCLUSIVE)",
    );
    // Added NOT VALID by a backfill stopped before its VALIDATE: validated now (unless the original is NOT VALID too).
    if (r.present) {
      if (!r.validated && !/ NOT VALID$/.test(r.def)) out.push(validate);
      continue;
    }
    const def = r.def
      .replace(/ NOT VALID$/, "")
      .replace(` REFERENCES ${r.ref}(`, ` REFERENCES ${quoteQualified(to.copy)}(`);
    // An original that is NOT VALID itself stays so on the shadow (its old rows were never checked).
    const originalNotValid = / NOT VALID$/.test(r.def);
    const notValid = r.version >= 180000 || originalNotValid;
    // Before 18, a partitioned shadow's foreign key goes on through its leaf partitions (leafForeignKeySteps).
    if (!notValid) {
      const leaves = await leafPartitions(sql, from.copy);
      if (leaves.length > 0) {
        out.push(...leafForeignKeySteps({ group, fk: fk.name, def, from, to, leaves, lockTimeoutMs, opts }));
        continue;
      }
    }
    const site = new LockSite(
      [
        { table: from.copy, mode: "SHARE ROW EXCLUSIVE" },
        { table: to.copy, mode: "SHARE ROW EXCLUSIVE" },
      ],
      {
        table: `group ${group}`,
        command: "backfill: foreign key",
        lockTimeoutMs,
        terminateAfterMs: opts.terminateHoldersAfterMs ?? null,
      },
    );
    // The referenced shadow first, as ADD FOREIGN KEY would lock it.
    const lock = statement(
      `LOCK TABLE ${quoteQualified(to.copy)}, ${shadow} IN SHARE ROW EXCLUSIVE MODE`,
      "transaction",
      `foreign key ${fk.name} of ${displayName(fk.from)} -> ${displayName(fk.to)}, between their shadows`,
    );
    out.push(
      lockedTransaction(
        [
          ...site.steps(lock),
          statement(
            `ALTER TABLE ${shadow} ADD CONSTRAINT ${name} ${def}${notValid ? " NOT VALID" : ""}`,
            "transaction",
            notValid
              ? "NOT VALID: no scan under the lock; validated after COMMIT"
              : "a partitioned table without partitions: nothing to check",
          ),
        ],
        { lockTimeoutMs },
        [site],
      ),
    );
    if (notValid && !originalNotValid) out.push(validate);
  }
  return out;
}

const LeafRow = z.object({ schema: z.string(), name: z.string() });

/** The leaf partitions of `table` (at every level), by name: [] for a table with none. */
async function leafPartitions(sql: AnySql, table: QualifiedName): Promise<QualifiedName[]> {
  const rows = await sql`
    select n.nspname as schema, c.relname as name
      from pg_catalog.pg_partition_tree(to_regclass(${quoteQualified(table)})) t
      join pg_catalog.pg_class c on c.oid = t.relid
      join pg_catalog.pg_namespace n on n.oid = c.relnamespace
     where t.isleaf and c.relkind = 'r'
     order by 1, 2`;
  return rows.map((r) => LeafRow.parse(r));
}

/**
 * Before PostgreSQL 18, the foreign key `fk` (`def`: FOREIGN KEY (...) REFERENCES <referenced shadow> (...)) added
 * to the partitioned shadow `from.copy` through its leaf partitions, so that no scan runs under a lock that blocks
 * writes. A leaf partition is a plain table, which takes a NOT VALID foreign key:
 * 1. one transaction (SHARE ROW EXCLUSIVE on both shadows, under lock_timeout, looked at first: LockSite) adds it
 *    NOT VALID to each leaf: no scan;
 * 2. each leaf's VALIDATE CONSTRAINT checks its rows, holding SHARE UPDATE EXCLUSIVE on the leaf and ROW SHARE on
 *    the referenced shadow: the mirror's writes go on;
 * 3. one transaction adds it to the shadow itself: PostgreSQL finds the equivalent validated constraint on each
 *    partition and attaches it instead of creating (and checking) a new one (tablecmds.c, addFkRecurseReferencing,
 *    tryAttachPartitionForeignKey, which refuses a child constraint that is not validated: hence step 2 first).
 *    Measured on 14 to 17 (500,000 rows, a leaf under a sub-partition too): 3 to 12 ms, against 300 to 500 ms for
 *    the plain ADD; no "validating foreign key constraint" (DEBUG1), no scan of a leaf (pg_stat_user_tables); it
 *    holds SHARE ROW EXCLUSIVE on both shadows and, for those milliseconds, ACCESS EXCLUSIVE on their partitions
 *    (it replaces the attached constraints' triggers), so the LockSite looks for ACCESS EXCLUSIVE conflicts.
 * Between steps 1 and 3 each leaf also holds one NOT VALID row per partition of the referenced shadow (the
 * referenced side, which VALIDATE leaves so): step 3 drops them, leaving what a plain ADD leaves (checked on 14-17).
 * Each step is re-runnable after a crash (the ADDs are guarded by the constraint's name, VALIDATE of a validated
 * constraint does nothing). A partition created after step 1 gets a new, checked, constraint at step 3.
 */
function leafForeignKeySteps(a: {
  group: string;
  fk: string;
  def: string;
  from: Migration;
  to: Migration;
  leaves: readonly QualifiedName[];
  lockTimeoutMs: number;
  opts: { terminateHoldersAfterMs?: number | null };
}): Step[] {
  const name = quoteIdent(a.fk);
  const shadow = quoteQualified(a.from.copy);
  const referenced = quoteQualified(a.to.copy);
  const guardedAdd = (table: string, suffix: string) =>
    doBlock(
      `IF NOT EXISTS (SELECT FROM pg_catalog.pg_constraint WHERE conrelid = ${quoteLiteral(table)}::regclass ` +
        `AND conname = ${quoteLiteral(a.fk)} AND contype = 'f') THEN ` +
        `ALTER TABLE ${table} ADD CONSTRAINT ${name} ${a.def}${suffix}; END IF;`,
    );
  const what = `foreign key ${a.fk} of ${displayName(a.from.live)} -> ${displayName(a.to.live)}, between their shadows`;
  const site = (mode: "SHARE ROW EXCLUSIVE" | "ACCESS EXCLUSIVE", command: string) =>
    new LockSite(
      [
        { table: a.from.copy, mode },
        { table: a.to.copy, mode },
      ],
      {
        table: `group ${a.group}`,
        command,
        lockTimeoutMs: a.lockTimeoutMs,
        terminateAfterMs: a.opts.terminateHoldersAfterMs ?? null,
      },
    );
  // The referenced shadow first, as ADD FOREIGN KEY would lock it.
  const lock = (why: string) =>
    statement(`LOCK TABLE ${referenced}, ${shadow} IN SHARE ROW EXCLUSIVE MODE`, "transaction", why);
  const addSite = site("SHARE ROW EXCLUSIVE", "backfill: foreign key on the leaf partitions");
  const attachSite = site("ACCESS EXCLUSIVE", "backfill: foreign key on the shadow");
  return [
    lockedTransaction(
      [
        ...addSite.steps(lock(`${what}: NOT VALID on each leaf partition (no scan)`)),
        ...a.leaves.map((l) => statement(guardedAdd(quoteQualified(l), " NOT VALID"), "transaction")),
      ],
      { lockTimeoutMs: a.lockTimeoutMs },
      [addSite],
    ),
    ...a.leaves.map((l) =>
      statement(
        `ALTER TABLE ${quoteQualified(l)} VALIDATE CONSTRAINT ${name}`,
        "session",
        "checks the leaf's rows without blocking writes (SHARE UPDATE EXCLUSIVE)",
      ),
    ),
    lockedTransaction(
      [
        ...attachSite.steps(lock(`${what}: attaches the validated constraints of the leaves (no scan)`)),
        statement(guardedAdd(shadow, ""), "transaction"),
      ],
      { lockTimeoutMs: a.lockTimeoutMs },
      [attachSite],
    ),
  ];
}
