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
import { LockSite, lockedTransaction } from "../locks/holders.js";
import { partitionedIsLive } from "../migration/phases.js";
import type { Migration } from "../migration/state.js";
import { displayName, quoteIdent, quoteQualified } from "../names.js";
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
 * table_constraint: "NOT VALID ... not supported for foreign keys on partitioned tables" until 18), so the ADD
 * checks the copied rows under that lock: about as long as reading the referencing shadow.
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
              : "before PostgreSQL 18 a partitioned table takes no NOT VALID foreign key: the rows are checked here",
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
