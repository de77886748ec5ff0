import postgres from "postgres";
import { startEmbedded } from "../../src/embedded.js";
import { sleep } from "./db.js";

/**
 * A statement recorder independent of pgshift's runner: a dedicated embedded server whose own statement log
 * (log_statement = 'all', log_line_prefix carrying the session id, the virtual transaction id and
 * application_name; pgshift names its sessions `pgshift <command>`) says what every session sent.
 *
 * The log is the server's stderr, which startEmbedded hands to its `log` callback line by line. The logging
 * collector (csvlog) would be safer against interleaved lines, but with it the server's readiness line goes to
 * the log file, not to stderr where startEmbedded waits for it. Read here: an entry starts with the prefix;
 * a line starting with a tab continues the entry's message (PostgreSQL indents the further lines of a
 * message); any other line is the rest of a line that the pipe delivered in two reads.
 */

/** One statement a client sent, as the server logged it. */
export interface LoggedStatement {
  /** Position in the log. */
  n: number;
  session: string;
  app: string;
  /** Virtual transaction id: statements of one transaction block share it. */
  vxid: string;
  /** The statement as the server received it (`$n` for the parameters of the extended protocol). */
  text: string;
}

export interface StatementLog {
  /** URL of the `postgres` database. */
  url: string;
  /** Writes a mark in the log and returns its position once the log holds it (everything logged before too). */
  mark(): Promise<number>;
  /** The statements logged between two marks (mark() results), in log order. */
  between(from: number, to: number): Promise<LoggedStatement[]>;
  stop(): Promise<void>;
}

const PREFIX = /^@@([^|]*)\|([^|]*)\|(.*?)@@ (\w+): {2}([\s\S]*)$/;
const MARK = "one-plan test mark ";

/** Starts the dedicated server and turns its statement log on (log_statement and log_line_prefix, reloaded). */
export async function startStatementLog(): Promise<StatementLog> {
  const lines: string[] = [];
  const server = await startEmbedded({
    log: (l) => {
      if (l.startsWith("@@") || lines.length === 0) lines.push(l);
      else if (l.startsWith("\t")) lines[lines.length - 1] += `\n${l.slice(1)}`;
      else lines[lines.length - 1] += l;
    },
  });
  const sql = postgres(server.url, { max: 1, onnotice: () => {}, connection: { application_name: "one-plan test" } });
  await sql.unsafe("alter system set log_line_prefix = '@@%c|%v|%a@@ '");
  await sql.unsafe("alter system set log_statement = 'all'");
  await sql.unsafe("select pg_reload_conf()");
  let marks = 0;
  const entries = (): LoggedStatement[] =>
    lines.flatMap((l, n) => {
      const m = PREFIX.exec(l);
      if (m?.[4] !== "LOG") return [];
      const msg = /^(statement|execute [^:]*): ([\s\S]*)$/.exec(m[5]!);
      return msg ? [{ n, session: m[1]!, app: m[3]!, vxid: m[2]!, text: msg[2]! }] : [];
    });
  const mark = async (): Promise<number> => {
    const id = ++marks;
    for (let attempt = 1; ; attempt++) {
      // Until the new settings are loaded (pg_reload_conf signals the postmaster), the mark may go unlogged.
      await sql.unsafe(`select '${MARK}${id}'`);
      for (let wait = 0; wait < 20; wait++) {
        const found = entries().find((e) => e.app === "one-plan test" && e.text.includes(`${MARK}${id}'`));
        if (found) return found.n;
        await sleep(50);
      }
      if (attempt >= 10) throw new Error(`mark ${id} never reached the statement log`);
    }
  };
  return {
    url: server.url,
    mark,
    between: async (from, to) => entries().filter((e) => e.n > from && e.n < to),
    stop: async () => {
      await sql.end({ timeout: 5 }).catch(() => {});
      await server.stop();
    },
  };
}

/**
 * Splits SQL text into statements on `;` outside quoted strings, quoted identifiers, dollar quotes and
 * comments; drops the comments and collapses white space, so that what --dry-run printed and what the
 * server logged compare as text.
 */
export function splitStatements(text: string): string[] {
  const out: string[] = [];
  let cur = "";
  let i = 0;
  const push = () => {
    const s = cur.replace(/\s+/g, " ").trim();
    if (s) out.push(s);
    cur = "";
  };
  while (i < text.length) {
    const c = text[i]!;
    const rest = text.slice(i);
    if (rest.startsWith("--")) {
      const nl = text.indexOf("\n", i);
      i = nl < 0 ? text.length : nl;
      cur += " ";
      continue;
    }
    if (rest.startsWith("/*")) {
      const end = text.indexOf("*/", i + 2);
      i = end < 0 ? text.length : end + 2;
      cur += " ";
      continue;
    }
    const dollar = /^\$([A-Za-z_][A-Za-z0-9_]*)?\$/.exec(rest);
    if (dollar) {
      const end = text.indexOf(dollar[0], i + dollar[0].length);
      const stop = end < 0 ? text.length : end + dollar[0].length;
      cur += text.slice(i, stop);
      i = stop;
      continue;
    }
    if (c === "'" || c === '"') {
      let j = i + 1;
      for (; j < text.length; j++) {
        if (text[j] === c) {
          if (text[j + 1] === c) j++;
          else break;
        }
      }
      cur += text.slice(i, j + 1);
      i = j + 1;
      continue;
    }
    if (c === ";") {
      push();
      i++;
      continue;
    }
    cur += c;
    i++;
  }
  push();
  return out;
}

/** What a statement is to the comparison (see classify). */
export type StatementKind = "plan" | "read" | "migration lock";

const WRITES = new RegExp(
  "^(begin|start|commit|end|abort|rollback|savepoint|release|set|reset|lock|create|alter|drop|" +
    "comment|grant|revoke|insert|update|delete|merge|truncate|analyze|vacuum|cluster|reindex|" +
    "refresh|do|call|copy|security|discard|prepare|deallocate|notify|listen|unlisten|import)\\b",
  "i",
);
const SIDE_EFFECTS = new RegExp(
  "\\b(set_config|pg_create_logical_replication_slot|pg_drop_replication_slot|" +
    "pg_replication_slot_advance|pg_terminate_backend|pg_cancel_backend|pg_logical_emit_message|" +
    "nextval|setval|pg_notify|pg_advisory_\\w+|pg_try_advisory_\\w+|lo_\\w+)\\s*\\(",
  "i",
);
const MIGRATION_LOCK = /^select pg_(try_advisory_lock|advisory_unlock)\(/i;

/**
 * How the comparison tells pgshift's plan from its reads of the catalog:
 * - `plan`: every statement that changes something or the session: DDL, INSERT/UPDATE/DELETE (a WITH that
 *   holds one too), LOCK, SET, transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT ...), ANALYZE, and a
 *   SELECT that calls a function with an effect (set_config, creating or dropping a replication slot, a
 *   logical message, an advisory lock, a sequence) or locks rows (FOR UPDATE / FOR SHARE);
 * - `read`: any other SELECT (the catalog looks, the batch's upper key, the chunk checksums): left aside on
 *   both sides;
 * - `migration lock`: the session advisory lock every command takes on its migration before it reads the
 *   state its plan is built from, and releases at the end (lockMigration): the same bracket for every
 *   command, not a step of any plan; left aside on both sides.
 */
export function classify(text: string): StatementKind {
  const t = text.trim().replace(/^\(+\s*/, "");
  if (MIGRATION_LOCK.test(t)) return "migration lock";
  if (WRITES.test(t)) return "plan";
  if (/^with\b/i.test(t) && /\b(insert|update|delete)\b/i.test(t)) return "plan";
  if (SIDE_EFFECTS.test(t)) return "plan";
  if (/\bfor\s+(update|no key update|share|key share)\b/i.test(t)) return "plan";
  return "read";
}

/** A printed plan: statements, and blocks that run a number of times (`-- { <times>: <what>` ... `-- }`). */
export type PlanItem =
  | { kind: "statement"; text: string }
  | { kind: "block"; times: string; what: string; items: PlanItem[] };

const BLOCK_OPEN = /^-- \{ (once|at most once|once or more|any number of times): (.*)$/;
const BLOCK_CLOSE = /^-- \}\s*$/;

/**
 * Reads what --dry-run printed: the statements (split as splitStatements does, comments dropped) and the
 * blocks formatSteps marks, nested as printed. Only `plan` statements (classify) are kept.
 * @throws when the block marks do not pair up.
 */
export function parsePrintedPlan(out: string): PlanItem[] {
  const root: PlanItem[] = [];
  const stack: PlanItem[][] = [root];
  let text = "";
  const flush = () => {
    for (const s of splitStatements(text))
      if (classify(s) === "plan") stack.at(-1)!.push({ kind: "statement", text: s });
    text = "";
  };
  for (const line of out.split("\n")) {
    const open = BLOCK_OPEN.exec(line);
    if (open) {
      flush();
      const b: PlanItem = { kind: "block", times: open[1]!, what: open[2]!, items: [] };
      stack.at(-1)!.push(b);
      stack.push(b.items);
    } else if (BLOCK_CLOSE.test(line)) {
      flush();
      if (stack.length === 1) throw new Error("the printed plan closes a block it never opened");
      stack.pop();
    } else text += `${line}\n`;
  }
  flush();
  if (stack.length !== 1) throw new Error("the printed plan leaves a block open");
  return root;
}

/** A printed plan as lines, blocks indented (for failure messages). */
export function showPlan(items: readonly PlanItem[], indent = "  "): string[] {
  return items.flatMap((it) =>
    it.kind === "statement"
      ? [`${indent}${it.text}`]
      : [`${indent}{ ${it.times}: ${it.what}`, ...showPlan(it.items, `${indent}  `), `${indent}}`],
  );
}

/**
 * Whether the statements that ran (in order) are the printed plan: its statements in its order, each block
 * as many times as its mark allows, a block's statements equal as text (their `$n` values aside).
 * @returns null when they are; else a message saying where they part: the statement that ran and the
 *   statements the plan expected there, with both lists.
 */
export function comparePlan(printed: readonly PlanItem[], ran: readonly string[]): string | null {
  const memo = new Map<readonly PlanItem[], Map<string, Set<number>>>();
  let furthest = { pos: -1, expected: new Set<string>() };
  const miss = (pos: number, expected: string) => {
    if (pos > furthest.pos) furthest = { pos, expected: new Set([expected]) };
    else if (pos === furthest.pos) furthest.expected.add(expected);
  };
  const ends = (items: readonly PlanItem[], i: number, pos: number): Set<number> => {
    const m = memo.get(items) ?? new Map<string, Set<number>>();
    memo.set(items, m);
    const key = `${i}:${pos}`;
    const known = m.get(key);
    if (known) return known;
    const result = new Set<number>();
    m.set(key, result);
    if (i === items.length) {
      result.add(pos);
      return result;
    }
    const it = items[i]!;
    if (it.kind === "statement") {
      if (ran[pos] === it.text) for (const e of ends(items, i + 1, pos + 1)) result.add(e);
      else miss(pos, it.text);
      return result;
    }
    const after = new Set<number>();
    if (it.times === "at most once" || it.times === "any number of times") after.add(pos);
    let frontier = new Set([pos]);
    const seen = new Set<number>();
    while (frontier.size > 0) {
      const next = new Set<number>();
      for (const p of frontier) for (const e of ends(it.items, 0, p)) if (!seen.has(e) && e !== p) next.add(e);
      for (const e of next) {
        seen.add(e);
        after.add(e);
      }
      if (it.times === "once" || it.times === "at most once") break;
      frontier = next;
    }
    for (const p of after) for (const e of ends(items, i + 1, p)) result.add(e);
    return result;
  };
  if (ends(printed, 0, 0).has(ran.length)) return null;
  const at = furthest.pos;
  const lines = [
    at >= ran.length
      ? `the plan expects more after the ${ran.length} statements that ran; next ` +
        `expected: ${[...furthest.expected].join(" | ")}`
      : `statement #${at + 1} that ran differs from the plan:`,
    ...(at < ran.length && at >= 0
      ? [`  ran:      ${ran[at]}`, ...[...furthest.expected].map((e) => `  expected: ${e}`)]
      : []),
    ...(at < 0 ? [`  nothing of the plan matched; the first statement that ran: ${ran[0] ?? "(none)"}`] : []),
    "--- what --dry-run printed (statements of the plan):",
    ...showPlan(printed),
    "--- what ran (statements of the plan):",
    ...ran.map((s, k) => `${k === at ? ">>" : "  "}${String(k + 1).padStart(4)} ${s}`),
  ];
  return lines.join("\n");
}
