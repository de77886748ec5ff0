import type { Sql, TxSql } from "../db.js";
import { withLockRetry, type LockRetryOptions } from "../db.js";
import { PgshiftError } from "../errors.js";
import { log } from "../log.js";
import { mirrorFor } from "../mirror/mirror.js";
import { displayName, quoteIdent, quoteQualified, type QualifiedName } from "../names.js";
import { loadMigration, lockMigration, requireMigration, unlockMigration, type Migration, type Phase } from "../migration/state.js";

export interface CutoverOptions extends LockRetryOptions {
  /** Test hook: runs inside the transaction after every statement, before COMMIT. */
  beforeCommit?: (tx: TxSql) => Promise<void>;
}

export interface CutoverResult {
  /** From the moment both ACCESS EXCLUSIVE locks were granted to COMMIT: how long writes were blocked, ms. */
  lockHeldMs: number;
  /** Attempts made (1 = the locks were granted at the first try). */
  attempts: number;
  phase: Phase;
  statements: string[];
}

/** The migration as it will be named in `phase` (names swap at cutover). */
function renamed(m: Migration, phase: Phase): Migration {
  const after = phase === "cutover";
  const schema = m.source_schema;
  const live = { schema, name: m.source_table };
  const shadow = { schema, name: m.shadow_table };
  const retired = { schema, name: m.retired_table };
  return { ...m, phase, copy: after ? retired : shadow, original: after ? retired : live, partitioned: after ? live : shadow };
}

/**
 * The statements of the cutover transaction (phase backfilled or swapped_back -> cutover), in order:
 * lock both tables, stop the forward mirror, rename the original to the retired name and the shadow to
 * the original name, give serial sequences to the new live table, start the reverse mirror (new live ->
 * retired) so swap-back loses nothing.
 */
export function cutoverSql(m: Migration): string[] {
  return switchSql(m, "cutover");
}

/** The statements of swap-back (phase cutover -> swapped_back): the same in reverse. */
export function swapBackSql(m: Migration): string[] {
  return switchSql(m, "swapped_back");
}

function switchSql(m: Migration, to: Phase): string[] {
  const mirror = mirrorFor(m.mode);
  const next = renamed(m, to);
  const out: string[] = [`LOCK TABLE ${quoteQualified(m.live)}, ${quoteQualified(m.copy)} IN ACCESS EXCLUSIVE MODE`];
  out.push(...mirror.stopSql(m));
  // m.live (original name) becomes the copy's name in the next phase; m.copy takes the original name.
  out.push(`ALTER TABLE ${quoteQualified(m.live)} RENAME TO ${quoteIdent(next.copy.name)}`);
  out.push(`ALTER TABLE ${quoteQualified(m.copy)} RENAME TO ${quoteIdent(m.source_table)}`);
  for (const s of m.sequences) {
    // Serial sequences follow the live table so that finalize (which drops the retired table) keeps them.
    // Identity sequences stay with the original table; finalize re-creates the identity on the new table.
    if (s.identity === "" && s.schema === m.source_schema) {
      out.push(`ALTER SEQUENCE ${quoteQualified({ schema: s.schema, name: s.name })} OWNED BY ${quoteQualified(next.live)}.${quoteIdent(s.column)}`);
    }
  }
  out.push(...mirror.startSql(next));
  return out;
}

async function switchTables(sql: Sql, table: QualifiedName, to: "cutover" | "swapped_back", from: Phase[], opts: CutoverOptions): Promise<CutoverResult> {
  await lockMigration(sql, table);
  try {
    const m0 = await requireMigration(sql, table, to === "cutover" ? "cut over" : "swap back", from);
    const health = await mirrorFor(m0.mode).health(sql, m0);
    if (!health.ok) throw new PgshiftError(`the mirror is not healthy: ${health.detail}`, { hint: "run pgshift verify --repair after fixing it, or pgshift abort" });
    let attempts = 0;
    let statements: string[] = [];
    const { lockHeldMs } = await withLockRetry(
      sql,
      async (tx) => {
        attempts++;
        const m = await loadMigration(tx, table);
        if (!m || !from.includes(m.phase)) throw new PgshiftError(`the migration of ${displayName(table)} changed phase meanwhile`);
        statements = to === "cutover" ? cutoverSql(m) : swapBackSql(m);
        await tx.unsafe(statements[0]!);
        const locked = performance.now();
        for (const stmt of statements.slice(1)) await tx.unsafe(stmt);
        await tx`
          update pgshift.migrations set phase = ${to}, updated_at = now(),
                 cutover_at = case when ${to} = 'cutover' then now() else cutover_at end,
                 swapped_back_at = case when ${to} = 'swapped_back' then now() else swapped_back_at end
           where id = ${m.id}`;
        await opts.beforeCommit?.(tx);
        return { locked };
      },
      {
        ...opts,
        onRetry: (n, err) => {
          log().warn({ attempt: n, err: err instanceof Error ? err.message : String(err) }, `${to}: locks not granted within the lock timeout, retrying`);
          opts.onRetry?.(n, err);
        },
      },
    ).then((r) => ({ lockHeldMs: performance.now() - r.locked }));
    log().info({ table: displayName(table), lockHeldMs: Math.round(lockHeldMs * 10) / 10, attempts }, to === "cutover" ? "cutover done" : "swap-back done");
    return { lockHeldMs, attempts, phase: to, statements };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}

/**
 * Cuts over: in one short transaction under `lock_timeout` (default 500 ms, 20 jittered retries), the
 * partitioned table takes the original name and the original table the retired name; writes to the new
 * live table are mirrored into the retired one from then on.
 * @throws PhaseError before the backfill is complete; PgshiftError when the locks are never granted in time.
 */
export function cutover(sql: Sql, table: QualifiedName, opts: CutoverOptions = {}): Promise<CutoverResult> {
  return switchTables(sql, table, "cutover", ["backfilled", "swapped_back"], opts);
}

/**
 * Swaps back after a cutover: the original table is live again, with every write made since the cutover
 * (the reverse mirror kept it current), and the partitioned table is the shadow again, still mirrored.
 * @throws PhaseError unless the migration is in phase cutover.
 */
export function swapBack(sql: Sql, table: QualifiedName, opts: CutoverOptions = {}): Promise<CutoverResult> {
  return switchTables(sql, table, "swapped_back", ["cutover"], opts);
}

