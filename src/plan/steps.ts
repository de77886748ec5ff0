/**
 * One plan: every command builds its work as a list of steps, and the same list is what `plan` and
 * `--dry-run` print and what runSteps executes. A step is a statement and where it runs; a check the runner
 * makes between statements (wait for the stream, look for objects created meanwhile) is a step too, printed
 * as a comment, so the printed plan shows every point where the command may stop.
 */
import type { AnySql } from "../db.js";

/**
 * Where a statement runs:
 * - `transaction`: inside the command's transaction (the runner's caller opened it; all or nothing);
 * - `session`: on the command's connection outside any transaction, committed on its own (autocommit);
 * - `concurrently`: outside any transaction, on its own, because PostgreSQL refuses it inside one
 *   (CREATE INDEX CONCURRENTLY, DETACH PARTITION ... CONCURRENTLY);
 * - `own-connection`: on a connection of its own, committed before the command goes on (a WAL flush that
 *   must not wait for the command's locks).
 */
export type StepWhere = "transaction" | "session" | "concurrently" | "own-connection";

/** A statement of a plan. */
export interface StatementStep {
  kind: "statement";
  /** The statement as PostgreSQL receives it, without the trailing semicolon. */
  sql: string;
  where: StepWhere;
  /** Why it runs (printed as a comment before it), if not obvious from the statement. */
  why?: string;
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

export type Step = StatementStep | CheckStep;

/** A statement step (the common case). */
export function statement(sql: string, where: StepWhere = "transaction", why?: string): StatementStep {
  return why === undefined ? { kind: "statement", sql, where } : { kind: "statement", sql, where, why };
}

/** A check step. */
export function check(what: string, run?: (sql: AnySql) => Promise<void>): CheckStep {
  return run === undefined ? { kind: "check", what } : { kind: "check", what, run };
}

const WHERE_COMMENT: Record<StepWhere, string> = {
  transaction: "in one transaction",
  session: "each committed on its own",
  concurrently: "outside any transaction",
  "own-connection": "on a connection of its own",
};

/**
 * The plan as --dry-run prints it: each statement followed by `;`, checks and reasons as `--` comments, and a
 * comment line wherever the place statements run changes (`-- in one transaction` ...). Ends with a newline.
 */
export function formatSteps(steps: readonly Step[]): string {
  const out: string[] = [];
  let where: StepWhere | null = null;
  for (const s of steps) {
    if (s.kind === "check") {
      out.push(`-- ${s.what}`);
      continue;
    }
    if (s.where !== where) {
      out.push(`-- ${WHERE_COMMENT[s.where]}:`);
      where = s.where;
    }
    if (s.why) out.push(`-- ${s.why}`);
    out.push(`${s.sql};`);
  }
  return `${out.join("\n")}\n`;
}

/** The statements of a plan, in order, as PostgreSQL receives them (what a statement recorder sees). */
export function statementsOf(steps: readonly Step[]): string[] {
  return steps.flatMap((s) => (s.kind === "statement" ? [s.sql] : []));
}

/**
 * Runs `steps` in order on `sql`: statements with `sql.unsafe` (simple query text, as printed), checks with
 * their `run`. The caller chooses the connection: a transaction for `transaction` steps, the pool or a
 * session for the others; a step whose `where` the caller does not serve must be run by the caller
 * (runSteps refuses `own-connection` steps unless `opts.ownConnection` is given).
 * @throws whatever a statement or check throws; the steps after it do not run.
 */
export async function runSteps(
  sql: AnySql,
  steps: readonly Step[],
  opts: { ownConnection?: AnySql } = {},
): Promise<void> {
  for (const s of steps) {
    if (s.kind === "check") {
      await s.run?.(sql);
      continue;
    }
    if (s.where === "own-connection") {
      if (!opts.ownConnection) throw new Error(`runSteps: no connection of its own given for: ${s.sql}`);
      await opts.ownConnection.unsafe(s.sql);
      continue;
    }
    await sql.unsafe(s.sql);
  }
}
