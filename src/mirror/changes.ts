import type { AnySql, TxSql } from "../db.js";
import { type QualifiedName, quoteIdent, quoteQualified } from "../names.js";
import { columnList } from "../sql/statement.js";

/** A row as pgoutput sends it: text, null, or undefined for an unchanged TOASTed value. */
export type Tuple = Record<string, string | null | undefined>;

/** A type as the catalog names it (pg_type.typname in its schema), to cast text to a column's type. */
export interface TypeName {
  schema: string;
  name: string;
}

/** What a batch writes into: the shadow table and the columns and keys it matches rows by. */
export interface BatchTarget {
  table: QualifiedName;
  /** Columns written (generated columns excluded), in table order. */
  columns: readonly string[];
  /** The type of each column in `columns`. */
  types: ReadonlyMap<string, TypeName>;
  /** The source's primary key (how the stream identifies a row). */
  pk: readonly string[];
  /** The shadow's primary key: `pk` plus the partition columns not in it. */
  key: readonly string[];
}

/** Net effect of a batch on one primary key: the row it ends as, or null when it ends deleted. */
interface Final {
  pk: (string | null)[];
  row: Tuple | null;
  /** The key's first change in the batch created it (INSERT, or UPDATE to a new key): it did not exist before. */
  fresh: boolean;
}

/**
 * Row changes of consecutive source transactions, kept as the net effect per primary key, and written to
 * the shadow in two statements: one DELETE, one multi-row INSERT ... ON CONFLICT DO UPDATE.
 *
 * Applying the net effect is the same as applying the changes one by one: every change of a primary key
 * leaves exactly one version of it in the shadow (or none), whatever was there before, so only the last
 * change of each key decides what remains. When the partition column is not part of the primary key, the
 * shadow may hold a version of the row under another partition (the row moved, or the backfill copied a
 * newer version than the stream has reached): the DELETE removes every version of each touched key except
 * the one the upsert writes (in exact mode, of the keys the upsert inserted; see write()). Only whole rows go in a
 * batch; an UPDATE with unchanged TOASTed values is
 * applied on its own (the caller writes the batch first, to keep commit order).
 *
 * A backfill batch's uncommitted copy of a row (the copy takes no row lock) is met by the upsert, which waits for
 * the batch and then overwrites it, but not by the DELETE, which does not see it: the batch then commits a ghost,
 * which its cleanup removes (src/backfill/cleanup.ts, "Logical mode").
 *
 * Memory: the batch holds the last version of each touched row; the caller writes it when `changes` or
 * `bytes` (value text, UTF-16 code units) pass its limits.
 */
export class ChangeBatch {
  private readonly t: BatchTarget;
  private readonly samePk: boolean;
  private finals = new Map<string, Final>();
  /** Row changes added since the last write. */
  changes = 0;
  /** Approximate size of the values held (characters). */
  bytes = 0;

  /** The statements write() sends, built once per target (their one parameter: a JSON array of rows). */
  private readonly text: ChangeStatements;

  constructor(target: BatchTarget) {
    this.t = target;
    this.samePk = target.key.length === target.pk.length;
    this.text = changeStatements(target);
  }

  private set(from: Tuple, row: Tuple | null, creates = false): void {
    const pk = this.t.pk.map((c) => (from[c] ?? null) as string | null);
    const k = JSON.stringify(pk);
    this.finals.set(k, { pk, row, fresh: this.finals.get(k)?.fresh ?? creates });
    if (row) for (const c of this.t.columns) this.bytes += row[c]?.length ?? 0;
  }

  /** An INSERT (whole row). */
  insert(row: Tuple): void {
    this.changes++;
    this.set(row, row, true);
  }

  /** An UPDATE of the row whose primary key is in `old` (`row` itself when the key did not change) to `row` (whole). */
  update(old: Tuple, row: Tuple): void {
    this.changes++;
    const newKey = old !== row && this.t.pk.some((c) => old[c] !== row[c]);
    if (newKey) this.set(old, null);
    this.set(row, row, newKey);
  }

  /** A DELETE of the row whose primary key is in `old`. */
  delete(old: Tuple): void {
    this.changes++;
    this.set(old, null);
  }

  /** Forgets what the batch holds (its transaction was rolled back). */
  clear(): void {
    this.finals = new Map();
    this.changes = 0;
    this.bytes = 0;
  }

  /**
   * Writes the net effect in `tx` (at most three statements) and empties the batch.
   *
   * `exact`: the shadow equals the table as of the stream's applied position (see Applier.groupModes), so a
   * key the batch created (fresh) has no version in the shadow yet, and any other key has exactly one,
   * somewhere. Fresh rows are inserted without looking for anything (a fresh key deleted again is skipped);
   * the other rows are upserted first, and only those the upsert inserted (their partition changed) are
   * then looked for under other partitions, with the deleted keys. Otherwise every touched key is looked
   * for in every partition before the upsert.
   */
  async write(tx: TxSql, exact = false): Promise<void> {
    const finals = this.finals;
    this.clear();
    if (finals.size === 0) return;
    const { pk, key, columns } = this.t;
    const pkObject = (values: (string | null)[]) => Object.fromEntries(pk.map((c, i) => [c, values[i]!]));
    const gone: Record<string, string | null>[] = [];
    const keep: Record<string, string | null>[] = [];
    const rows: Record<string, string | null>[] = [];
    const freshRows: Record<string, string | null>[] = [];
    const lookFirst = !this.samePk && !exact;
    for (const f of finals.values()) {
      const row = f.row;
      const fresh = exact && f.fresh;
      if (fresh && row === null) continue;
      if (row === null || lookFirst) gone.push(pkObject(f.pk));
      if (row === null) continue;
      (fresh ? freshRows : rows).push(Object.fromEntries(columns.map((c) => [c, row[c] ?? null])));
      if (!this.samePk && !fresh) keep.push(Object.fromEntries(key.map((c) => [c, row[c] ?? null])));
    }
    if (lookFirst) await this.deleteOthers(tx, gone, keep);
    if (freshRows.length > 0) await tx.unsafe(this.text.upsert, [JSON.stringify(freshRows)], PREPARED);
    if (rows.length > 0) {
      if (this.samePk || !exact) await tx.unsafe(this.text.upsert, [JSON.stringify(rows)], PREPARED);
      else {
        const inserted = await tx.unsafe<Record<string, string | null>[]>(
          this.text.upsertReturningInserted,
          [JSON.stringify(rows)],
          PREPARED,
        );
        for (const r of inserted) gone.push(pkObject(pk.map((c) => r[c] ?? null)));
      }
    }
    if (!lookFirst) await this.deleteOthers(tx, gone, keep);
  }

  /**
   * Deletes every row whose primary key is in `gone` and whose shadow key is not in `keep` (the final
   * versions): see ChangeStatements.deleteOthers.
   */
  private async deleteOthers(
    tx: TxSql,
    gone: Record<string, string | null>[],
    keep: Record<string, string | null>[],
  ): Promise<void> {
    if (gone.length === 0) return;
    if (keep.length === 0) await tx.unsafe(this.text.deleteOthers, [JSON.stringify(gone)], PREPARED);
    else await tx.unsafe(this.text.deleteOthersKeeping, [JSON.stringify(gone), JSON.stringify(keep)], PREPARED);
  }
}

/**
 * Sent prepared (postgres.js `prepare`: parsed and planned once per connection, then only bound and run):
 * the applier sends the same few statements for every batch.
 */
const PREPARED = { prepare: true } as const;

/** The statements of a ChangeBatch, as SQL text; `$1` (and `$2`) a JSON array of objects, values as text. */
export interface ChangeStatements {
  /** The multi-row upsert of the rows in `$1` (INSERT ... ON CONFLICT (shadow key) DO UPDATE). */
  upsert: string;
  /**
   * The upsert, returning the primary key (as text) of the rows it inserted: not at their shadow key before
   * the statement (its snapshot). A scalar subquery per row, so that each probes one partition (run-time
   * pruning) rather than being planned as a join with every partition.
   */
  upsertReturningInserted: string;
  /**
   * Deletes every row whose primary key is in `$1`. `= any(array(...))` per key column: an index scan of each
   * partition's primary key for all the keys at once (a join with the list could be planned as a scan of
   * every partition).
   */
  deleteOthers: string;
  /** The same, sparing the rows whose shadow key is in `$2` (the final versions). */
  deleteOthersKeeping: string;
}

/** The statements of a ChangeBatch writing into `t`. */
export function changeStatements(t: BatchTarget): ChangeStatements {
  const { pk, key, columns } = t;
  const table = quoteQualified(t.table);
  /** `u."c"::"schema"."type"`: the text of column `c` read by its type's input function, as for a literal. */
  const typed = (names: readonly string[]) =>
    names
      .map((c) => {
        const type = t.types.get(c);
        if (!type) throw new Error(`no type known for column ${c}`);
        return `u.${quoteIdent(c)}::${quoteQualified(type)}`;
      })
      .join(", ");
  /** `jsonb_to_recordset($n::jsonb) as u("c1" text, ...)`: the rows of a JSON array of objects, values as text. */
  const recordset = (param: string, names: readonly string[]) =>
    `jsonb_to_recordset(${param}::jsonb) as u(${names.map((c) => `${quoteIdent(c)} text`).join(", ")})`;
  const rest = columns.filter((c) => !key.includes(c));
  const set =
    rest.length === 0
      ? "do nothing"
      : `do update set ${rest.map((c) => `${quoteIdent(c)} = excluded.${quoteIdent(c)}`).join(", ")}`;
  const upsert =
    `insert into ${table} (${columnList(columns)}) select ${typed(columns)} from ${recordset("$1", columns)} ` +
    `on conflict (${columnList(key)}) ${set}`;
  const gone = [
    ...pk.map((c) => `s.${quoteIdent(c)} = any(array(select ${typed([c])} from ${recordset("$1", [c])}))`),
    ...(pk.length > 1 ? [`(${columnList(pk, "s")}) in (select ${typed(pk)} from ${recordset("$1", pk)})`] : []),
  ];
  const deleteOthers = `delete from ${table} as s where ${gone.join(" and ")}`;
  return {
    upsert,
    upsertReturningInserted:
      `with w as (${upsert} returning ${columnList(key)}) ` +
      `select ${pk.map((c) => `w.${quoteIdent(c)}::text as ${quoteIdent(c)}`).join(", ")} from w ` +
      `where (select count(*) from ${table} as s where (${columnList(key, "s")}) = (${columnList(key, "w")})) = 0`,
    deleteOthers,
    deleteOthersKeeping:
      `${deleteOthers} and (${columnList(key, "s")}) not in ` + `(select ${typed(key)} from ${recordset("$2", key)})`,
  };
}

/**
 * The types of `table`'s columns, for ChangeBatch.
 * @throws Error when the table is not found.
 */
export async function columnTypes(tx: AnySql, table: QualifiedName): Promise<Map<string, TypeName>> {
  const rows = await tx<{ attname: string; nspname: string; typname: string }[]>`
    select a.attname, n.nspname, t.typname
      from pg_catalog.pg_attribute a
      join pg_catalog.pg_type t on t.oid = a.atttypid
      join pg_catalog.pg_namespace n on n.oid = t.typnamespace
     where a.attrelid = (select c.oid from pg_catalog.pg_class c join pg_catalog.pg_namespace cn on
       cn.oid = c.relnamespace
                          where cn.nspname = ${table.schema} and c.relname = ${table.name})
       and a.attnum > 0 and not a.attisdropped`;
  if (rows.length === 0) throw new Error(`table ${table.schema}.${table.name} not found`);
  return new Map(rows.map((r) => [r.attname, { schema: r.nspname, name: r.typname }]));
}
