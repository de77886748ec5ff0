/**
 * Retention: the range partitions wholly older than the retention are detached, then dropped (or kept as tables
 * of their own with `keepTable`), as pg_partman's retention does. A time retention is an interval (`24 months`:
 * partitions whose upper bound is at or before now() - 24 months); an integer retention a distance in the key
 * (`1000000`: partitions whose upper bound is at or below the newest key minus 1000000). DEFAULT is never dropped.
 *
 * DETACH PARTITION ... CONCURRENTLY (PostgreSQL 14+) takes only SHARE UPDATE EXCLUSIVE on the table, but cannot
 * run in a transaction block and is refused when the table has a DEFAULT partition ("ALTER TABLE", DETACH
 * PARTITION): with a DEFAULT (pgshift gives every range-partitioned table one) the plain DETACH runs instead, in a
 * transaction of its own with a short lock_timeout and retries (its ACCESS EXCLUSIVE lock is held for the
 * catalog change only).
 */
import type { AnySql } from "../db.js";
import { PgshiftError } from "../errors.js";
import { LockSite, lockedTransaction } from "../locks/holders.js";
import { displayName, quoteIdent, quoteQualified } from "../names.js";
import type { PartitionSpec } from "../partitioning/spec.js";
import { type Step, statement } from "../plan/steps.js";
import type { ExistingPartition, TableLayout } from "./partitions.js";

/**
 * The cutoff ordinal of `retention` for `spec` (epoch seconds, or a key value); null when nothing is old enough
 * (an integer table with no row).
 * @throws PgshiftError (exit 2) when `retention` is not an interval (time ranges) or a positive integer (integer
 *   ranges), or the spec is not a range.
 */
export async function cutoff(
  sql: AnySql,
  layout: TableLayout,
  spec: PartitionSpec,
  retention: string,
): Promise<bigint | null> {
  if (spec.strategy === "range") {
    const r = await sql
      .unsafe("SELECT floor(extract(epoch from now() - $1::interval))::numeric(40,0)::text AS c", [retention])
      .catch(() => null);
    if (!r)
      throw new PgshiftError(`invalid --retention ${JSON.stringify(retention)}: not an interval`, {
        hint: "give an interval, e.g. --retention '24 months' or --retention '90 days'",
      });
    return BigInt(String(r[0]!.c));
  }
  if (spec.strategy === "range-int") {
    if (!/^[1-9][0-9]*$/.test(retention))
      throw new PgshiftError(`invalid --retention ${JSON.stringify(retention)} for an integer range`, {
        hint: "give a distance in the key, e.g. --retention 10000000 (partitions below the newest key minus it)",
      });
    const c = quoteIdent(spec.column);
    const r = await sql.unsafe(`SELECT max(${c})::text AS m FROM ${quoteQualified(layout.table)}`);
    const max = r[0]?.m as string | null;
    return max === null || max === undefined ? null : BigInt(max) - BigInt(retention);
  }
  throw new PgshiftError(`--retention needs a range partitioning (${layout.table.name} is ${spec.strategy})`, {
    hint: "drop list or hash partitions by hand",
  });
}

/** The partitions wholly before `cut` (upper bound at or below it), oldest first. */
export function expired(layout: TableLayout, cut: bigint | null): ExistingPartition[] {
  if (cut === null) return [];
  return layout.partitions
    .filter((p) => !p.isDefault && p.hi !== null && p.hi <= cut)
    .sort((a, b) => (a.hi! < b.hi! ? -1 : 1));
}

/** The steps that detach, then drop (unless `keepTable`), `p`. */
export function retentionSteps(
  layout: TableLayout,
  p: ExistingPartition,
  opts: { keepTable: boolean; lockTimeoutMs: number; terminateAfterMs?: number | null },
): Step[] {
  const parent = quoteQualified(layout.table);
  const table = { schema: layout.table.schema, name: p.name };
  const child = quoteQualified(table);
  const site = (what: string, target: typeof table) =>
    new LockSite([{ table: target, mode: "ACCESS EXCLUSIVE" }], {
      table: displayName(layout.table),
      command: `maintain: retention ${what}`,
      lockTimeoutMs: opts.lockTimeoutMs,
      terminateAfterMs: opts.terminateAfterMs ?? null,
    });
  const steps: Step[] = [];
  if (layout.defaultPartition) {
    const s = site("detach", layout.table);
    steps.push(
      lockedTransaction(
        [
          ...s.steps(statement(`LOCK TABLE ONLY ${parent}, ${child} IN ACCESS EXCLUSIVE MODE`)),
          statement(`ALTER TABLE ${parent} DETACH PARTITION ${child}`),
        ],
        {
          lockTimeoutMs: opts.lockTimeoutMs,
          why: `retention: detach ${p.name} (a DEFAULT partition exists: PostgreSQL refuses CONCURRENTLY)`,
        },
        [s],
      ),
    );
  } else
    steps.push(
      statement(`ALTER TABLE ${parent} DETACH PARTITION ${child} CONCURRENTLY`, "concurrently", `retention: ${p.name}`),
    );
  if (!opts.keepTable) {
    const s = site("drop", table);
    steps.push(
      lockedTransaction(
        [...s.steps(statement(`LOCK TABLE ${child} IN ACCESS EXCLUSIVE MODE`)), statement(`DROP TABLE ${child}`)],
        { lockTimeoutMs: opts.lockTimeoutMs, why: `retention: drop the detached ${p.name}` },
        [s],
      ),
    );
  }
  return steps;
}
