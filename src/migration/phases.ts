/**
 * The state machine of a migration: its phases, which command takes which phase to which, and which table
 * is live and which is the copy in each phase. Every command checks its phase here (requireMigration), the
 * names of the tables in a phase come from here (tablesIn), and the SQL that needs the same answer (the DDL
 * guard) is generated from here (namesInSql), so TypeScript and SQL cannot disagree.
 *
 *   started --backfill--> backfilling --(done)--> backfilled --cutover--> cutover --swap-back--> swapped_back
 *                                                                            |  ^--------cutover-------'
 *                                                                         finalize (row deleted)
 *   abort (row deleted) from started, backfilling, backfilled, swapped_back.
 *
 * In `cutover` the partitioned table carries the original name and the original table the retired name; in
 * every other phase the original table carries its name and the partitioned one the shadow name.
 */

export const PHASES = ["started", "backfilling", "backfilled", "cutover", "swapped_back"] as const;
export type Phase = (typeof PHASES)[number];

/**
 * The phases in which, in logical mode, the shadow follows the replication slot (until the first cutover);
 * from cutover on the reverse mirror is a row trigger and the stream applies nothing more.
 */
export const STREAMING_PHASES: readonly Phase[] = ["started", "backfilling", "backfilled"];

/** The commands that act on a migration in progress (plan, start and status act before one or read it only). */
export const COMMANDS = [
  "backfill",
  "sync",
  "verify",
  "cutover",
  "swap-back",
  "finalize",
  "abort",
  "pause",
  "resume",
] as const;
export type Command = (typeof COMMANDS)[number];

/** One row of the state machine: the phases a command accepts, and the phase it leaves the migration in. */
export interface Transition {
  /** Phases in which the command may run. */
  from: readonly Phase[];
  /**
   * The phase after the command succeeds; "same" when it does not change the phase, "deleted" when it forgets the
   * migration.
   */
  to: Phase | "same" | "deleted";
  /** The command as a verb, for messages ("cannot cut over public.orders: ..."). */
  verb: string;
}

/** The state machine as a table: every command that acts on a migration, with the phases it accepts. */
export const TRANSITIONS: Readonly<Record<Command, Transition>> = {
  // backfill passes through backfilling (its checkpoints) and ends in backfilled; rerun, it resumes or does nothing.
  backfill: { from: ["started", "backfilling", "backfilled", "swapped_back"], to: "backfilled", verb: "backfill" },
  // sync applies the stream while the shadow follows the slot (before the first cutover).
  sync: { from: ["started", "backfilling", "backfilled"], to: "same", verb: "sync" },
  verify: { from: ["backfilled", "cutover", "swapped_back"], to: "same", verb: "verify" },
  cutover: { from: ["backfilled", "swapped_back"], to: "cutover", verb: "cut over" },
  "swap-back": { from: ["cutover"], to: "swapped_back", verb: "swap back" },
  finalize: { from: ["cutover"], to: "deleted", verb: "finalize" },
  abort: { from: ["started", "backfilling", "backfilled", "swapped_back"], to: "deleted", verb: "abort" },
  // pause and resume the copy and the verify: every phase has one of them (backfill or verify) to run.
  pause: { from: PHASES, to: "same", verb: "pause" },
  resume: { from: PHASES, to: "same", verb: "resume" },
};

/** What to run next in each phase, from the phase alone (status says more: nextStepFor in liveness.ts). */
export const NEXT_STEP: Readonly<Record<Phase, string>> = {
  started: "run pgshift backfill",
  backfilling: "run pgshift backfill (it resumes from its checkpoint)",
  backfilled: "run pgshift verify, then pgshift cutover",
  cutover: "run pgshift verify, then pgshift finalize --yes (or pgshift swap-back)",
  swapped_back: "run pgshift cutover again, or pgshift abort",
};

/** Whether `command` may run in `phase` (TRANSITIONS). */
export function allows(command: Command, phase: Phase): boolean {
  return TRANSITIONS[command].from.includes(phase);
}

/** The names a migration row keeps: the schema, the original name, the shadow's and the retired table's. */
export interface TableNames {
  source_schema: string;
  source_table: string;
  shadow_table: string;
  retired_table: string;
}

/** A table's schema and name. */
export interface NamedTable {
  schema: string;
  name: string;
}

/** The tables of a migration as they are named in a phase. */
export interface PhaseTables {
  /** The table the application writes to: always under the original name. */
  live: NamedTable;
  /** The table that receives the mirror: the shadow before cutover, the retired (original) table after. */
  copy: NamedTable;
  /** The original (unpartitioned) table under its name in this phase. */
  original: NamedTable;
  /** The partitioned table under its name in this phase. */
  partitioned: NamedTable;
}

/** Whether the partitioned table is the live one in `phase` (only in cutover). */
export function partitionedIsLive(phase: Phase): boolean {
  return phase === "cutover";
}

/** The tables of a migration as named in `phase` (names swap at cutover and back at swap-back). */
export function tablesIn(row: TableNames, phase: Phase): PhaseTables {
  const schema = row.source_schema;
  const live = { schema, name: row.source_table };
  const shadow = { schema, name: row.shadow_table };
  const retired = { schema, name: row.retired_table };
  const after = partitionedIsLive(phase);
  return { live, copy: after ? retired : shadow, original: after ? retired : live, partitioned: after ? live : shadow };
}

/**
 * The same as tablesIn, as SQL expressions over a row of pgshift.migrations (columns phase, source_table,
 * shadow_table, retired_table), for the SQL that must agree with it (the DDL guard). `alias`: the row's
 * alias or table name, if any. Each value is an expression giving the table's name (its schema is always
 * source_schema).
 */
export function namesInSql(alias = ""): Record<"live" | "copy" | "original" | "partitioned", string> {
  const c = (col: string) => (alias ? `${alias}.${col}` : col);
  const cut = PHASES.filter(partitionedIsLive)
    .map((p) => `'${p}'`)
    .join(", ");
  const when = (ifCut: string, otherwise: string) =>
    `CASE WHEN ${c("phase")} IN (${cut}) THEN ${c(ifCut)} ELSE ${c(otherwise)} END`;
  return {
    live: c("source_table"),
    copy: when("retired_table", "shadow_table"),
    original: when("retired_table", "source_table"),
    partitioned: when("source_table", "shadow_table"),
  };
}
