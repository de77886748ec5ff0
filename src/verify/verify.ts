import { requireNoDrift } from "../catalog/drift.js";
import type { LockRetryOptions, Sql, TxSql } from "../db.js";
import { PgshiftError, sqlState } from "../errors.js";
import { emit } from "../events.js";
import { log } from "../log.js";
import {
  lockMigration,
  type Migration,
  requireMigration,
  unlockMigration,
  type VerifyResult,
} from "../migration/state.js";
import { mirrorFor } from "../mirror/mirror.js";
import { CatchupTimeout, type StreamFollower } from "../mirror/stream.js";
import { displayName, type QualifiedName, quoteIdent, quoteQualified } from "../names.js";
import { PaceGate, type Waiting } from "../pace/gate.js";
import { Throttle, type ThrottleOptions } from "../pace/throttle.js";
import {
  block,
  check,
  formatSteps,
  runSteps,
  runTransaction,
  type Step,
  statement,
  type TransactionStep,
  transactionStep,
} from "../plan/steps.js";
import { columnList, rowCompare } from "../sql/statement.js";

export type DifferenceKind = "missing" | "extra" | "different";

/** A key whose row differs: missing from the copy, extra in the copy, or present in both with other values. */
export interface Difference {
  kind: DifferenceKind;
  /** Key values as text, in key column order. */
  key: string[];
  /**
   * Why `--repair` could not rewrite this key: the integrity error PostgreSQL raised (message and detail),
   * for instance a duplicate key when the live (partitioned) table holds two rows with one original key
   * and the retired table's unique index refuses the second. Absent when no repair was tried or it succeeded.
   */
  reason?: string;
}

export interface VerifyOptions extends LockRetryOptions, ThrottleOptions {
  /** Rows of the live table per chunk (default 10000). */
  chunkSize?: number;
  /** Rewrite differing rows of the copy from the live table. */
  repair?: boolean;
  /** At most this many differing keys are kept in the result (default 1000); all are counted. */
  maxListed?: number;
  onChunk?: (done: { chunks: number; rowsCompared: number; differences: number }) => void;
  /** Called when verify starts waiting before a chunk (paused, throttled: see PaceGate) and with null when it ends. */
  onWait?: (w: Waiting | null) => void;
  /**
   * Logical mode: how long to wait for the stream to apply what was written before a second look (default 120000 ms).
   */
  catchupTimeoutMs?: number;
}

export interface VerifyReport extends VerifyResult {
  /** The table the application writes to, and the table compared with it. */
  live: string;
  copy: string;
  differences: Difference[];
}

interface ChunkBounds {
  lo: string[] | null;
  hi: string[] | null;
}

/**
 * Sent prepared (postgres.js `prepare`: parsed once per connection, then only bound and run): the same
 * statements run for every chunk, with its bounds as their values.
 */
const PREPARED = { prepare: true } as const;

/** The values of a chunk's statements: its lower bound's key values, then its upper bound's. */
const boundValues = (b: ChunkBounds): string[] => [...(b.lo ?? []), ...(b.hi ?? [])];

/**
 * The statements that read a chunk, as printed and sent, for a chunk with a lower bound (`lo`: every chunk
 * but the first; `$1 ...` its key values) and an upper bound (`hi`: every chunk but the last; the next
 * parameters its key values):
 * - `lastKey`: the chunk's last key as text (k0, k1 ...), the `chunkSize`-th key after `lo` (no row: the last
 *   chunk); parameters: `lo` only;
 * - `compare`: count(*) and two 64-bit XORs of hashtextextended(row text, seed 0 and 1) of each table over
 *   the chunk (an, ah0, ah1 of the live table; bn, bh0, bh1 of the copy);
 * - `keys(t)`: the key (k0 ...) and row hash (h) of every row of table `t` in the chunk.
 * The row text is `row("a", "b", ...)::text` over the compared columns (the same types on both sides).
 */
function chunkStatements(m: Migration, lo: boolean, hi: boolean, chunkSize: number) {
  const key = m.key_columns;
  const keyCols = columnList(key);
  const conds = [
    ...(lo ? [rowCompare(key, ">", 1)] : []),
    ...(hi ? [rowCompare(key, "<=", lo ? key.length + 1 : 1)] : []),
  ];
  const where = conds.length === 0 ? "" : ` WHERE ${conds.join(" AND ")}`;
  const textKey = key.map((c, i) => `${quoteIdent(c)}::text AS k${i}`).join(", ");
  const rowText = `row(${columnList(m.copy_columns)})::text`;
  const side = (t: QualifiedName) =>
    `SELECT count(*)::bigint AS n, coalesce(bit_xor(hashtextextended(r, 0)), 0)::text AS h0, ` +
    `coalesce(bit_xor(hashtextextended(r, 1)), 0)::text AS h1 ` +
    `FROM (SELECT ${rowText} AS r FROM ${quoteQualified(t)}${where}) s`;
  return {
    lastKey:
      `SELECT ${textKey} FROM (SELECT ${keyCols} FROM ${quoteQualified(m.live)}${lo ? ` WHERE ${conds[0]}` : ""} ` +
      `ORDER BY ${keyCols} OFFSET ${chunkSize - 1} LIMIT 1) s`,
    compare:
      `SELECT a.n AS an, a.h0 AS ah0, a.h1 AS ah1, b.n AS bn, b.h0 AS bh0, b.h1 AS bh1 ` +
      `FROM (${side(m.live)}) a, (${side(m.copy)}) b`,
    keys: (t: QualifiedName) =>
      `SELECT ${textKey}, hashtextextended(${rowText}, 0)::text AS h FROM ${quoteQualified(t)}${where}`,
  };
}

/**
 * Compares the live table with its copy (shadow before cutover, retired table after) chunk by chunk.
 *
 * Each chunk is a range of the key, `chunkSize` rows of the live table, read in one REPEATABLE READ
 * snapshot: the mirror writes both tables in the application's own transaction, so one snapshot sees
 * them consistent and concurrent writes give no false differences. PostgreSQL computes, per side,
 * count(*) and two 64-bit XORs of hashtextextended(row text, seed 0 and 1); only that one small row
 * crosses the network. A chunk that differs is drilled down in the same snapshot to the keys that are
 * missing, extra or different. With `repair`, those keys are rewritten in the copy from the live table
 * under a SHARE lock of the live table (writes wait at most lock_timeout; retried), then rechecked. A key
 * the copy's constraints refuse (a duplicate: after cutover the partitioned live table may hold two rows
 * with one original key, which the retired table's unique index refuses) is left as the copy has it and
 * reported as a difference with PostgreSQL's reason (`Difference.reason`), never thrown.
 *
 * @returns the report; `equal` is true when no difference remains. Also stored as the migration's last verify.
 * @throws PgshiftError / PhaseError when there is no migration or the backfill is not finished.
 */
export async function verify(sql: Sql, table: QualifiedName, opts: VerifyOptions = {}): Promise<VerifyReport> {
  await lockMigration(sql, table);
  try {
    const m = await requireMigration(sql, table, "verify");
    await requireNoDrift(sql, m, "verify");
    // A throttle query that fails is refused before anything changes.
    await new Throttle(opts).validate(sql);
    const plan = planVerify(sql, m, opts);
    try {
      await runSteps(sql, plan.steps);
    } finally {
      await plan.state.gate?.clear().catch(() => {});
      await plan.state.follower?.stop();
    }
    const result = plan.state.result!;
    log().info(
      { table: displayName(table), ...result },
      result.equal ? "verify: tables are equal" : "verify: tables differ",
    );
    return { ...result, live: displayName(m.live), copy: displayName(m.copy), differences: plan.state.differences };
  } finally {
    await unlockMigration(sql, table).catch(() => {});
  }
}

/**
 * What verify would run for `table` now, as verify --dry-run prints it (formatSteps of planVerify's steps: a
 * chunk's and a key's statements once, their key values as `$n`). Changes nothing.
 */
export async function describeVerify(sql: Sql, table: QualifiedName, opts: VerifyOptions = {}): Promise<string> {
  const m = await requireMigration(sql, table, "verify", { upgrade: false });
  await requireNoDrift(sql, m, "verify");
  return formatSteps(planVerify(sql, m, opts).steps);
}

/** What a verify being run has found so far. */
interface VerifyState {
  follower: StreamFollower | null;
  /** The wait before each chunk (pause, throttles). */
  gate: PaceGate | null;
  differences: Difference[];
  result: VerifyResult | null;
}

/** The statements of a repair, as printed and sent (`$n`: the values of one key). */
function repairStatements(m: Migration) {
  const keyCols = m.key_columns.map(quoteIdent).join(", ");
  const match = `(${keyCols}) = (${m.key_columns.map((_, i) => `$${i + 1}`).join(", ")})`;
  const cols = m.copy_columns.map(quoteIdent).join(", ");
  const overriding =
    m.phase === "cutover" && m.sequences.some((s) => s.identity === "a") ? " OVERRIDING SYSTEM VALUE" : "";
  return {
    lock: `LOCK TABLE ${quoteQualified(m.live)} IN SHARE MODE`,
    savepoint: "SAVEPOINT pgshift_repair",
    remove: `DELETE FROM ${quoteQualified(m.copy)} WHERE ${match}`,
    insert:
      `INSERT INTO ${quoteQualified(m.copy)} (${cols})${overriding} SELECT ${cols} ` +
      `FROM ${quoteQualified(m.live)} WHERE ${match}`,
    release: "RELEASE SAVEPOINT pgshift_repair",
    rollback: "ROLLBACK TO SAVEPOINT pgshift_repair",
  };
}

/**
 * verify's plan for migration `m` (what verify runs and verify --dry-run prints): the chunks compared one
 * snapshot each (in logical mode a differing chunk looked at again once the stream applied what was written
 * meanwhile); with `opts.repair`, a differing chunk's keys rewritten in the copy under a SHARE lock of the live
 * table; then the result recorded in the migration's row. The blocks carry the code that runs them with the
 * very statements printed; what it finds goes to `state`.
 */
export function planVerify(sql: Sql, m: Migration, opts: VerifyOptions = {}): { steps: Step[]; state: VerifyState } {
  const chunkSize = opts.chunkSize ?? 10000;
  const maxListed = opts.maxListed ?? 1000;
  const lockTimeoutMs = opts.lockTimeoutMs ?? 500;
  const gate = new PaceGate(sql, m, "verify", opts);
  const state: VerifyState = { follower: null, gate, differences: [], result: null };
  const mirror = mirrorFor(m.mode);
  const logical = mirror.streams(m);
  const c = chunkStatements(m, true, true, chunkSize);
  const look = transactionStep(
    [
      statement(
        c.lastKey,
        "transaction",
        `the chunk's last key ($1 ...: the previous chunk's last key; the first chunk has no lower bound)`,
      ),
      statement(
        c.compare,
        "transaction",
        `count(*) and row hashes of both tables over the chunk ($${m.key_columns.length + 1} ...: its last key; ` +
          `the last chunk has no upper bound)`,
      ),
      block("at most once", "when the chunk differs: the key and row hash of each of its rows", [
        statement(c.keys(m.live)),
        statement(c.keys(m.copy)),
      ]),
    ],
    { modes: "ISOLATION LEVEL REPEATABLE READ READ ONLY" },
  );
  const r = repairStatements(m);
  const repairTx = transactionStep(
    [
      statement(r.lock),
      ...(logical ? [check("wait, under the lock, until the stream applied every write before it (2 s at most)")] : []),
      block(
        "any number of times",
        "each differing key ($1 ...: its key), again after the others while some go through",
        [
          statement(r.savepoint),
          statement(r.remove),
          block("at most once", "unless the DELETE failed", [statement(r.insert)]),
          block("at most once", "when the key went through", [statement(r.release)]),
          block("at most once", "when the copy's constraints refused it", [statement(r.rollback)]),
        ],
      ),
      statement(c.keys(m.live), "transaction", "compare the chunk's keys again"),
      statement(c.keys(m.copy)),
    ],
    { lockTimeoutMs },
  );
  const recordWhere = `WHERE id = ${m.id}`;
  const recordSql = `UPDATE pgshift.migrations SET last_verify = $1::text::jsonb, updated_at = now() ${recordWhere}`;
  const compare = async () => {
    const t0 = performance.now();
    const counts = { missing: 0, extra: 0, different: 0 };
    let rowsCompared = 0;
    let chunks = 0;
    let chunksDiffering = 0;
    let repaired = 0;
    let lo: string[] | null = null;
    const follower = state.follower;
    for (;;) {
      // Between chunks (never inside one): wait while paused or throttled.
      await gate.wait();
      const lookAt = (fixedHi?: string[] | null) =>
        runTransaction(sql, look, async (tx) => {
          const hi = fixedHi === undefined ? await nthKeyAfter(tx, m, lo, chunkSize) : fixedHi;
          const bounds = { lo, hi };
          const same = await compareChunk(tx, m, bounds, chunkSize);
          const diffs = same.equal ? [] : await drillDown(tx, m, bounds, chunkSize);
          return { hi, rows: same.rows, diffs };
        });
      let res = await lookAt();
      // A key counts only if it differs in every look: a row the application changes meanwhile differs in
      // one look (until the stream applies the change) and not in the next.
      for (let again = 0; follower && res.diffs.length > 0 && again < 8; again++) {
        const target = String((await sql`select pg_current_wal_insert_lsn()::text as l`)[0]!.l);
        if (!(await follower.waitForRecorded(target, opts.catchupTimeoutMs ?? 120_000))) {
          throw new PgshiftError(
            `the stream did not catch up within ${opts.catchupTimeoutMs ?? 120_000} ms: the shadow cannot be ` +
              `compared yet`,
            {
              hint:
                "the applier is slower than the write load; let pgshift sync run, throttle the load, then verify " +
                "again",
            },
          );
        }
        const next = await lookAt(res.hi);
        const still = new Set(next.diffs.map((d) => d.kind + JSON.stringify(d.key)));
        res = { ...next, diffs: res.diffs.filter((d) => still.has(d.kind + JSON.stringify(d.key))) };
      }
      chunks++;
      rowsCompared += res.rows;
      if (res.diffs.length > 0) {
        chunksDiffering++;
        let remaining = res.diffs;
        if (opts.repair) {
          remaining = await repairKeys(sql, m, repairTx, { lo, hi: res.hi }, chunkSize, res.diffs, opts, follower);
          // Counted by key: a key the copy refused may come back as more than one difference (a duplicate).
          const left = new Set(remaining.map((d) => JSON.stringify(d.key)));
          repaired += new Set(res.diffs.map((d) => JSON.stringify(d.key)).filter((k) => !left.has(k))).size;
        }
        for (const d of remaining) {
          counts[d.kind]++;
          if (state.differences.length < maxListed) state.differences.push(d);
        }
      }
      emit("verifyChunk", { table: displayName(m.live), rows: res.rows, differences: res.diffs.length });
      opts.onChunk?.({ chunks, rowsCompared, differences: counts.missing + counts.extra + counts.different });
      if (!res.hi) break;
      lo = res.hi;
    }
    state.result = {
      at: new Date().toISOString(),
      equal: counts.missing + counts.extra + counts.different === 0,
      rowsCompared,
      chunks,
      chunksDiffering,
      ...counts,
      repaired,
      ms: Math.round(performance.now() - t0),
    };
    await sql.unsafe(recordSql, [JSON.stringify(state.result)]);
    const r = state.result;
    emit("verifyDone", {
      table: displayName(m.live),
      equal: r.equal,
      missing: r.missing,
      extra: r.extra,
      different: r.different,
    });
  };
  const chunk: Step[] = [
    look,
    ...(logical
      ? [
          block("any number of times", "while the chunk differs (8 times at most): look again", [
            check("wait until the stream applied everything written until now"),
            look,
          ]),
        ]
      : []),
    ...(opts.repair
      ? [block("at most once", "when the chunk differs: rewrite its differing keys in the copy", [repairTx])]
      : []),
  ];
  const steps: Step[] = [
    ...(logical
      ? [
          check("follow the replication stream: apply it in this process, or watch pgshift sync apply it", async () => {
            state.follower = await mirror.follow(sql, m);
          }),
        ]
      : []),
    block(
      "once",
      `the comparison of ${displayName(m.live)} with ${displayName(m.copy)}, chunk by chunk in key order`,
      [
        ...gate.steps(),
        block("once or more", `each chunk of ${chunkSize} rows of ${displayName(m.live)}, in one snapshot`, chunk),
        statement(recordSql, "session", "the result ($1, JSON), kept as the migration's last verify"),
      ],
      compare,
    ),
  ];
  return { steps, state };
}

/** The `n`-th key of the live table after `lo` (text), or null when fewer rows remain (last chunk). */
async function nthKeyAfter(tx: TxSql, m: Migration, lo: string[] | null, n: number): Promise<string[] | null> {
  const text = chunkStatements(m, lo !== null, false, n).lastKey;
  const row = (await tx.unsafe(text, lo ?? [], PREPARED))[0];
  return row ? m.key_columns.map((_, i) => String(row[`k${i}`])) : null;
}

async function compareChunk(
  tx: TxSql,
  m: Migration,
  b: ChunkBounds,
  chunkSize: number,
): Promise<{ equal: boolean; rows: number }> {
  const text = chunkStatements(m, b.lo !== null, b.hi !== null, chunkSize).compare;
  const x = (await tx.unsafe(text, boundValues(b), PREPARED))[0]!;
  return { equal: x.an === x.bn && x.ah0 === x.bh0 && x.ah1 === x.bh1, rows: Number(x.an) };
}

/** Keys of one chunk whose rows differ, computed from per-row hashes read in the chunk's snapshot. */
async function drillDown(tx: TxSql, m: Migration, b: ChunkBounds, chunkSize: number): Promise<Difference[]> {
  const out: Difference[] = [];
  const statements = chunkStatements(m, b.lo !== null, b.hi !== null, chunkSize);
  const read = async (t: QualifiedName, duplicate: DifferenceKind) => {
    const rows = await tx.unsafe(statements.keys(t), boundValues(b), PREPARED);
    const map = new Map<string, { key: string[]; h: string }>();
    for (const row of rows) {
      const k = m.key_columns.map((_, i) => String(row[`k${i}`]));
      const id = JSON.stringify(k);
      // A second row with the same primary key (the partitioned table's key also holds the partition
      // column, so it can hold one version per partition): a row the other side lacks, whatever its values.
      if (map.has(id)) out.push({ kind: duplicate, key: k });
      else map.set(id, { key: k, h: String(row.h) });
    }
    return map;
  };
  const live = await read(m.live, "missing");
  const copy = await read(m.copy, "extra");
  for (const [id, a] of live) {
    const c = copy.get(id);
    if (!c) out.push({ kind: "missing", key: a.key });
    else if (c.h !== a.h) out.push({ kind: "different", key: a.key });
  }
  for (const [id, c] of copy) if (!live.has(id)) out.push({ kind: "extra", key: c.key });
  return out;
}

/** SQLSTATE class 23, integrity constraint violation (PostgreSQL documentation, Appendix A). */
const isIntegrityViolation = (err: unknown) => sqlState(err)?.startsWith("23") ?? false;

/**
 * Rewrites each key of `diffs` in the copy from the live table (delete the copy's rows with the key, insert
 * the live table's), each inside its own savepoint. A key the copy's constraints refuse (SQLSTATE class 23:
 * a duplicate in a unique index, as when the partitioned live table holds two rows with one original key
 * and the copy is the retired table; a check; a foreign key) is rolled back to its savepoint, so the copy
 * keeps the rows it had for it, and tried again after the others (deleting another key's stale row may free
 * the value); what still fails is returned with PostgreSQL's message and detail, never thrown.
 * @returns JSON text of a key -> the SQLSTATE and why it could not be rewritten; empty when every key was.
 * @throws any other error (a lost connection, a lock timeout: the caller's transaction is retried).
 */
async function rewriteKeys(
  tx: TxSql,
  m: Migration,
  diffs: readonly Difference[],
): Promise<Map<string, { code: string; reason: string }>> {
  const r = repairStatements(m);
  const byId = new Map(diffs.map((d) => [JSON.stringify(d.key), d.key] as const));
  let pending = [...byId.keys()];
  const failed = new Map<string, { code: string; reason: string }>();
  for (;;) {
    failed.clear();
    for (const id of pending) {
      const key = byId.get(id)!;
      await tx.unsafe(r.savepoint);
      try {
        await tx.unsafe(r.remove, key);
        await tx.unsafe(r.insert, key);
        await tx.unsafe(r.release);
      } catch (err) {
        if (!isIntegrityViolation(err)) throw err;
        await tx.unsafe(r.rollback);
        const e = err as { message?: string; detail?: string };
        failed.set(id, {
          code: sqlState(err) ?? "",
          reason: `${e.message ?? String(err)}${e.detail ? ` (${e.detail})` : ""}`,
        });
      }
    }
    if (failed.size === 0 || failed.size === pending.length) return failed;
    pending = [...failed.keys()];
  }
}

/** How long a repair in logical mode holds the table locked waiting for the stream, ms. */
const REPAIR_CATCHUP_MS = 2000;

/**
 * Rewrites the differing keys of the copy from the live table while the live table is locked in SHARE
 * mode (no write can interleave), then rechecks them in the same transaction. In logical mode the stream
 * first applies every write made before the lock.
 * @returns the differences that remain (normally none).
 * @throws PgshiftError when, on every attempt, the stream does not catch up within 2 s (the lock is released
 *   and the attempt retried, as for a lock timeout; what earlier chunks repaired stays repaired).
 */
async function repairKeys(
  sql: Sql,
  m: Migration,
  t: TransactionStep,
  b: ChunkBounds,
  chunkSize: number,
  diffs: Difference[],
  opts: LockRetryOptions,
  follower: StreamFollower | null,
): Promise<Difference[]> {
  return runTransaction(
    sql,
    t,
    async (tx) => {
      await tx.unsafe(repairStatements(m).lock);
      if (follower) {
        // Logical mode: copy the rows as the stream would have them, not ahead of it (the applier relies on
        // the shadow equalling the table as of its position): wait, under the lock, until it has applied
        // every write before the lock (the application's writes wait meanwhile: 2 s at most).
        // Applied means recorded with its rows (waitForRecorded), not confirmed on the slot, as at cutover.
        const target = String((await tx`select pg_current_wal_insert_lsn()::text as l`)[0]!.l);
        if (!(await follower.waitForRecorded(target, REPAIR_CATCHUP_MS)))
          throw new CatchupTimeout(
            `the stream did not apply everything up to ${target} within ${REPAIR_CATCHUP_MS} ms`,
          );
      }
      const failed = await rewriteKeys(tx, m, diffs);
      const still = (await drillDown(tx, m, b, chunkSize)).map((d) => {
        const f = failed.get(JSON.stringify(d.key));
        return f === undefined ? d : { ...d, reason: f.reason };
      });
      log().info(
        {
          rewritten: new Set(diffs.map((d) => JSON.stringify(d.key))).size - failed.size,
          refused: failed.size,
          remaining: still.length,
        },
        "verify: repaired differing rows",
      );
      for (const [key, { code, reason }] of failed) {
        const todo =
          code === "23505"
            ? m.phase === "cutover"
              ? `keep one row with this key in ${displayName(m.live)} (delete the other: the reverse mirror removes ` +
                `the key from the copy too)`
              : `remove the row of ${displayName(m.copy)} that holds the value in the way`
            : `correct the row in ${displayName(m.live)} or the constraint of ${displayName(m.copy)}`;
        log().warn(
          { key: JSON.parse(key) as string[], reason },
          `verify: could not repair key ${key} of ${displayName(m.copy)}: ${reason}; ${todo}, then run verify ` +
            `--repair again`,
        );
      }
      return still;
    },
    {
      retries: opts.retries ?? 5,
      retryOn: (err) => err instanceof CatchupTimeout,
      onRetry: (n, err) =>
        log().warn(
          { attempt: n, err: err instanceof Error ? err.message : String(err) },
          "verify: repair not done in time (lock or stream), lock released, retrying",
        ),
    },
  ).catch((err: unknown) => {
    if (err instanceof CatchupTimeout) {
      throw new PgshiftError(
        `${err.message} while the table was locked for the repair, on every attempt; nothing more was repaired`,
        {
          hint: "let pgshift sync catch up (pgshift status shows the lag) and run verify --repair again",
          cause: err,
        },
      );
    }
    throw err;
  });
}
