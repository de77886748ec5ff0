/**
 * pgshift as a library. The CLI is a thin shell over these functions.
 *
 *   import { connect, parseTableName, parsePartitionSpec, startMigration, backfill, verify, cutover } from "pgshift";
 *
 * The product's other parts are not exported here: the demo (src/demo/, `pgshift demo`), its load generator
 * (src/load/workload.ts, which the tests use too) and the embedded PostgreSQL server (src/embedded.ts).
 */

export { type BackfillOptions, type BackfillProgress, type BackfillResult, backfill } from "./backfill/backfill.js";
export { inspectTable, type TableFacts } from "./catalog/inspect.js";
export {
  type CutoverOptions,
  type CutoverResult,
  cutover,
  cutoverSql,
  swapBack,
  swapBackSql,
} from "./cutover/cutover.js";
export { type ConnectOptions, connect, type LockRetryOptions, type Sql, withLockRetry } from "./db.js";
export { extendIndexKey, shadowDdl } from "./ddl/shadow.js";
export { BlockedError, explain, isConnectionLoss, PgshiftError, PhaseError } from "./errors.js";
export { type EventName, on, type PgshiftEvents } from "./events.js";
export { backfillGroup, type GroupBackfillResult } from "./group/backfill.js";
export { finishGroup, type GroupFinishResult } from "./group/finish.js";
export { loadGroup } from "./group/members.js";
export { type GroupStartResult, planGroupStart, startGroup } from "./group/start.js";
export { type GroupSwitchResult, groupSwitchPlan, switchGroup } from "./group/switch.js";
export { type Liveness, liveness, nextStepFor, type SessionInfo } from "./liveness.js";
export { createLogger, log, setLogger } from "./log.js";
export {
  type MaintainOptions,
  type MaintainResult,
  maintain,
  maintainAll,
} from "./maintain/maintain.js";
export { handOff } from "./maintain/partman.js";
export {
  ALLOW_DDL_SETTING,
  DDL_GUARD_TRIGGER,
  DROP_GUARD_TRIGGER,
  ddlGuardSql,
  ddlGuardState,
} from "./migration/ddl-guard.js";
export { abort, abortSql, finalize, finalizeSql } from "./migration/finish.js";
export {
  type AffectedStatement,
  affectedStatements,
  type StatementCheck,
  type WidenedKey,
  widenedKeys,
} from "./migration/keys.js";
export {
  allows,
  COMMANDS,
  type Command,
  type NamedTable,
  NEXT_STEP,
  PHASES,
  type Phase,
  type PhaseTables,
  type TableNames,
  TRANSITIONS,
  type Transition,
  tablesIn,
} from "./migration/phases.js";
export { type MigrationPlan, type PlanOptions, planMigration } from "./migration/plan.js";
export { keyExtensionRefusal, type StartOptions, type StartResult, startMigration } from "./migration/start.js";
export { loadMigration, type Migration, MODES, type Mode, type VerifyResult } from "./migration/state.js";
export { type ApplierProgress, StreamFenced } from "./mirror/apply.js";
export { type Mirror, type MirrorHealth, mirrorFor, triggerMirror } from "./mirror/mirror.js";
export { type SyncOptions, type SyncReconnect, type SyncTick, sync } from "./mirror/sync.js";
export { displayName, parseTableName, type QualifiedName, quoteIdent, quoteLiteral, quoteQualified } from "./names.js";
export { HOOKS, type HookName, type HookResult, Hooks, type HookVars } from "./observe/hooks.js";
export { createMetrics, type MetricsServer, type PgshiftMetrics, serveMetrics } from "./observe/metrics.js";
export type { Waiting } from "./pace/gate.js";
export { type PauseState, pause, resume } from "./pace/pause.js";
export type { ThrottleOptions } from "./pace/throttle.js";
export { computePartitions, computeSubPartitions, type PartitionDef } from "./partitioning/bounds.js";
export {
  formatPartitionSpec,
  formatSpecs,
  type PartitionSpec,
  parsePartitionSpec,
  parseSpecs,
  parseSubPartitionSpec,
  type SubPartitionSpec,
} from "./partitioning/spec.js";
export {
  type CheckStep,
  formatSteps,
  type StatementStep,
  type Step,
  type StepWhere,
  statementsOf,
} from "./plan/steps.js";
export { type StatusReport, status } from "./status.js";
export { type Difference, type VerifyOptions, type VerifyReport, verify } from "./verify/verify.js";
