/**
 * One plan: every command builds its work as a list of steps, and the same list is what `plan` and
 * `--dry-run` print and what runSteps executes. A step is a statement and where it runs; a transaction
 * (BEGIN, SET LOCAL lock_timeout, its steps, COMMIT, printed and sent as they are); a block of steps that runs
 * a number of times known only while running (a backfill's batches, a repair's keys), printed once with its
 * values as `$n` parameters; or a check the runner makes between statements (wait for the stream, look for
 * objects created meanwhile), printed as a comment, so the printed plan shows every point where the command
 * may stop.
 */
import type { Row } from "postgres";
import { type AnySql, closedSince, type LockRetryOptions, retryOnLockTimeout, type Sql, type TxSql } from "../db.js";
import { isConnectionLoss, PgshiftError } from "../errors.js";

/**
 * Where a statement runs:
 * - `transaction`: inside the command's transaction (the runner's caller opened it; all or nothing);
 * - `session`: on the command's connection outside any transaction, committed on its own (autocommit);
 * - `concurrently`: outside any transaction, on its own, because PostgreSQL refuses it inside one
 *   (CREATE INDEX CONCURRENTLY, DETACH PARTITION ... CONCURRENTLY);
 * - `own-connection`: on a connection of its own, committed before the command goes on (a WAL flush that
 *   must not wait for the command's locks).
 * Statements inside a TransactionStep run in that transaction whatever their `where`.
 */
export type StepWhere = "transaction" | "session" | "concurrently" | "own-connection";

/** A statement of a plan. */
export interface StatementStep {
  kind: "statement";
  /**
   * The statement as PostgreSQL receives it, without the trailing semicolon. Inside a BlockStep it may hold
   * `$1`, `$2` ...: the values of one batch, bound by the block's `run`.
   */
  sql: string;
  where: StepWhere;
  /** Why it runs (printed as a comment before it), if not obvious from the statement. */
  why?: string;
  /** Gets the statement's rows when runSteps runs it (a later check waits for a value read here). */
  read?: (rows: readonly Row[]) => void;
}

/**
 * A check or wait the runner makes between statements, with no statement of its own (or with statements
 * whose values cannot be known before it runs: a wait for the stream, a batch's keys). `run` does it on the
 * connection or transaction the runner is on.
 */
export interface CheckStep {
  kind: "check";
  /** What it checks or waits for, printed as a comment. */
  what: string;
  run?: (sql: AnySql) => Promise<void>;
}

/**
 * One transaction: `BEGIN [options]`, `SET LOCAL lock_timeout = '<n>ms'` when `lockTimeoutMs` is set, the
 * steps, `COMMIT`. With a lock_timeout, the whole transaction is run again (jittered backoff, 50 ms to 2 s)
 * when a lock is not granted in time (SQLSTATE 55P03) or a deadlock is detected (40P01), so the application
 * never queues behind pgshift for longer than the lock timeout (docs: "Explicit Locking", lock_timeout).
 */
export interface TransactionStep {
  kind: "transaction";
  steps: Step[];
  /** BEGIN's transaction modes as printed, e.g. `ISOLATION LEVEL REPEATABLE READ READ ONLY`. */
  modes?: string;
  /** lock_timeout of the transaction, ms; absent: the server's setting, no retry. */
  lockTimeoutMs?: number;
  /** Why it runs (printed as a comment before BEGIN). */
  why?: string;
}

/** How many times a block runs: printed after `-- {` so that a reader (and a test) knows. */
export type BlockTimes = "once" | "at most once" | "once or more" | "any number of times";

/**
 * Steps that run a number of times the plan cannot know (a backfill's batches, a verify's chunks, a repair's
 * keys) or only in some case (the fallback of a batch that met a row the mirror wrote). Printed once, between
 * `-- { <times>: <what>` and `-- }`; the values that differ from one run to the next are `$n` parameters of
 * its statements. `run` runs the block (with those very statements); a block `once` without `run` runs its
 * steps as runSteps does.
 */
export interface BlockStep {
  kind: "block";
  times: BlockTimes;
  what: string;
  steps: Step[];
  run?: (sql: AnySql) => Promise<void>;
}

export type Step = StatementStep | CheckStep | TransactionStep | BlockStep;

/** A statement step (the common case). */
export function statement(sql: string, where: StepWhere = "transaction", why?: string): StatementStep {
  return why === undefined ? { kind: "statement", sql, where } : { kind: "statement", sql, where, why };
}

/** A check step. */
export function check(what: string, run?: (sql: AnySql) => Promise<void>): CheckStep {
  return run === undefined ? { kind: "check", what } : { kind: "check", what, run };
}

/** A transaction step (see TransactionStep). */
export function transactionStep(
  steps: Step[],
  opts: { modes?: string; lockTimeoutMs?: number; why?: string } = {},
): TransactionStep {
  return { kind: "transaction", steps, ...opts };
}

/** A block step (see BlockStep). */
export function block(times: BlockTimes, what: string, steps: Step[], run?: (sql: AnySql) => Promise<void>): BlockStep {
  return run === undefined ? { kind: "block", times, what, steps } : { kind: "block", times, what, steps, run };
}

/** BEGIN of a transaction step, as printed and sent. */
export function beginSql(t: TransactionStep): string {
  return t.modes ? `BEGIN ${t.modes}` : "BEGIN";
}

/** The SET LOCAL of a transaction's lock_timeout, as printed and sent. */
export function lockTimeoutSql(ms: number): string {
  return `SET LOCAL lock_timeout = '${Math.round(ms)}ms'`;
}

export const COMMIT_SQL = "COMMIT";

const WHERE_COMMENT: Record<StepWhere, string> = {
  transaction: "in one transaction",
  session: "each committed on its own",
  concurrently: "outside any transaction",
  "own-connection": "on a connection of its own",
};

/**
 * The plan as --dry-run prints it: each statement followed by `;`, checks and reasons as `--` comments, a
 * comment line wherever the place statements run changes (`-- in one transaction` ...), transactions as
 * BEGIN ... COMMIT, blocks between `-- { <times>: <what>` and `-- }`. Ends with a newline.
 */
export function formatSteps(steps: readonly Step[]): string {
  const out: string[] = [];
  let where: StepWhere | null = null;
  const put = (list: readonly Step[], inTx: boolean) => {
    for (const s of list) {
      if (s.kind === "check") out.push(`-- ${s.what}`);
      else if (s.kind === "block") {
        out.push(`-- { ${s.times}: ${s.what}`);
        put(s.steps, inTx);
        out.push("-- }");
      } else if (s.kind === "transaction") {
        if (s.why) out.push(`-- ${s.why}`);
        out.push(`${beginSql(s)};`);
        if (s.lockTimeoutMs !== undefined) out.push(`${lockTimeoutSql(s.lockTimeoutMs)};`);
        put(s.steps, true);
        out.push(`${COMMIT_SQL};`);
        where = null;
      } else {
        if (!inTx && s.where !== where) {
          out.push(`-- ${WHERE_COMMENT[s.where]}:`);
          where = s.where;
        }
        if (s.why) out.push(`-- ${s.why}`);
        out.push(`${s.sql};`);
      }
    }
  };
  put(steps, false);
  return `${out.join("\n")}\n`;
}

/**
 * The statements of a plan, in order, as PostgreSQL receives them (what a statement recorder sees): a
 * transaction's BEGIN, SET LOCAL and COMMIT included, a block's statements once.
 */
export function statementsOf(steps: readonly Step[]): string[] {
  return steps.flatMap((s): string[] => {
    if (s.kind === "statement") return [s.sql];
    if (s.kind === "block") return statementsOf(s.steps);
    if (s.kind === "transaction")
      return [
        beginSql(s),
        ...(s.lockTimeoutMs !== undefined ? [lockTimeoutSql(s.lockTimeoutMs)] : []),
        ...statementsOf(s.steps),
        COMMIT_SQL,
      ];
    return [];
  });
}

export interface RunOptions {
  /** The connection `own-connection` statements run on (runSteps refuses them without one). */
  ownConnection?: AnySql;
  /** Retries of a transaction step with a lock_timeout (attempts after the first, default 20; onRetry, retryOn). */
  lockRetry?: Omit<LockRetryOptions, "lockTimeoutMs">;
}

/**
 * Runs `steps` in order on `sql`: statements with `sql.unsafe` (the text as printed), their rows to `read`;
 * checks with their `run`; transactions with runTransaction (`sql` must then be a pool, not a transaction);
 * blocks with their `run`, or their steps once. The caller chooses the connection: a transaction for
 * `transaction` statements outside a TransactionStep, the pool or a session for the others.
 * @throws whatever a statement or check throws; the steps after it do not run.
 */
export async function runSteps(sql: AnySql, steps: readonly Step[], opts: RunOptions = {}): Promise<void> {
  for (const s of steps) {
    if (s.kind === "check") {
      await s.run?.(sql);
      continue;
    }
    if (s.kind === "block") {
      if (s.run) await s.run(sql);
      else if (s.times === "once") await runSteps(sql, s.steps, opts);
      else throw new Error(`runSteps: block "${s.what}" (${s.times}) has no run`);
      continue;
    }
    if (s.kind === "transaction") {
      if (!("reserve" in sql)) throw new Error("runSteps: a transaction step needs a pool, not a transaction");
      await runTransaction(sql as Sql, s, (tx) => runSteps(tx, s.steps, opts), opts.lockRetry);
      continue;
    }
    if (s.where === "own-connection") {
      if (!opts.ownConnection) throw new Error(`runSteps: no connection of its own given for: ${s.sql}`);
      // Not s.read?.(await ...): an optional call skips its arguments when there is no read.
      const rows = await opts.ownConnection.unsafe(s.sql);
      s.read?.(rows);
      continue;
    }
    const rows = await sql.unsafe(s.sql);
    s.read?.(rows);
  }
}

/**
 * Runs the transaction `t` on a reserved connection of `sql`: sends beginSql(t), lockTimeoutSql when
 * `t.lockTimeoutMs` is set, then `body` (which runs t's steps: runSteps, or a block's own code with their
 * values), then COMMIT; ROLLBACK on error. Sends nothing after the connection is lost (postgres.js would
 * write to the dead socket). With a lock_timeout, the whole transaction runs again on 55P03 / 40P01 (and on
 * errors `opts.retryOn` accepts), `opts.retries` times at most (default 20), after a jittered pause.
 * @throws PgshiftError (55P03) when the locks are never granted in time; any other error of `body` as is.
 */
export async function runTransaction<T>(
  sql: Sql,
  t: TransactionStep,
  body: (tx: TxSql) => Promise<T>,
  opts: Omit<LockRetryOptions, "lockTimeoutMs"> = {},
): Promise<T> {
  const once = async (): Promise<T> => {
    const closed = closedSince(sql);
    const tx = await sql.reserve();
    let lost = false;
    try {
      await tx.unsafe(beginSql(t));
      if (t.lockTimeoutMs !== undefined) await tx.unsafe(lockTimeoutSql(t.lockTimeoutMs));
      const result = await body(tx);
      if (closed())
        throw new PgshiftError("the connection to the server was lost before COMMIT", {
          hint: "re-run the command: the transaction was rolled back by the server",
        });
      await tx.unsafe(COMMIT_SQL);
      return result;
    } catch (err) {
      lost = isConnectionLoss(err) || closed();
      if (!lost) await tx.unsafe("ROLLBACK").catch(() => {});
      throw err;
    } finally {
      // A lost connection was already taken back by the pool as closed.
      if (!lost && !closed()) tx.release();
    }
  };
  if (t.lockTimeoutMs === undefined) return once();
  return retryOnLockTimeout(once, t.lockTimeoutMs, opts);
}
