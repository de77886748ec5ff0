/**
 * pgshift as a library. The CLI is a thin shell over these functions.
 *
 *   import { connect, parseTableName, parsePartitionSpec, startMigration, backfill, verify, cutover } from "pgshift";
 */
export { connect, withLockRetry, type Sql, type ConnectOptions, type LockRetryOptions } from "./db.js";
export { PgshiftError, BlockedError, PhaseError, explain } from "./errors.js";
export { createLogger, log, setLogger } from "./log.js";
export { parseTableName, quoteIdent, quoteLiteral, quoteQualified, displayName, type QualifiedName } from "./names.js";
export { parsePartitionSpec, formatPartitionSpec, type PartitionSpec } from "./partitioning/spec.js";
export { computePartitions, type PartitionDef } from "./partitioning/bounds.js";
export { inspectTable, type TableFacts } from "./catalog/inspect.js";
export { shadowDdl, extendIndexKey } from "./ddl/shadow.js";
export { mirrorFor, triggerMirror, type Mirror, type MirrorHealth } from "./mirror/mirror.js";
export { planMigration, type MigrationPlan, type PlanOptions } from "./migration/plan.js";
export { startMigration, keyExtensionRefusal, type StartOptions, type StartResult } from "./migration/start.js";
export { widenedKeys, affectedStatements, type WidenedKey, type AffectedStatement, type StatementCheck } from "./migration/keys.js";
export { ddlGuardSql, ddlGuardState, ALLOW_DDL_SETTING, DDL_GUARD_TRIGGER, DROP_GUARD_TRIGGER } from "./migration/ddl-guard.js";
export { loadMigration, PHASES, type Migration, type Phase, type VerifyResult } from "./migration/state.js";
export { backfill, type BackfillOptions, type BackfillProgress, type BackfillResult } from "./backfill/backfill.js";
export { verify, type VerifyOptions, type VerifyReport, type Difference } from "./verify/verify.js";
export { cutover, swapBack, cutoverSql, swapBackSql, type CutoverOptions, type CutoverResult } from "./cutover/cutover.js";
export { finalize, abort, finalizeSql, abortSql } from "./migration/finish.js";
export { status, type StatusReport } from "./status.js";
export { liveness, nextStepFor, type Liveness, type SessionInfo } from "./liveness.js";
export { createWorkload, startLoad, compareWithTwin, type Workload, type KeyKind, type LoadStats } from "./load/workload.js";
