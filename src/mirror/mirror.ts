import type { AnySql, Sql } from "../db.js";
import { partitionedIsLive } from "../migration/phases.js";
import type { Migration, Mode, StreamingMigration } from "../migration/state.js";
import { quoteQualified } from "../names.js";
// logical.ts builds on triggerMirror (used only inside functions, so the import cycle is harmless).
import { logicalMirror } from "./logical.js";
import type { StreamFollower } from "./stream.js";
import { installTriggerMirrorSql, MIRROR_TRIGGER, removeMirrorTriggerSql, TRUNCATE_TRIGGER } from "./trigger.js";

/** Health of the mirror as `status` shows it. */
export interface MirrorHealth {
  mode: Mode;
  ok: boolean;
  /** One line for a person: "row trigger enabled on public.orders -> public.orders_pgshift_shadow". */
  detail: string;
}

/**
 * The mirror keeps the copy (shadow before cutover, retired table after) in step with the live table.
 * One interface, one implementation per mode; cutover and swap-back only ask it for statements to run
 * inside their transaction, so both modes share the same rename logic.
 */
export interface Mirror {
  readonly mode: Mode;
  /** Statements that (re)start mirroring from `m.live` into `m.copy` for the phase `m` is in. */
  startSql(m: Migration): string[];
  /**
   * Statements that stop mirroring out of `m.live` (run before renames, and by abort/finalize). The TRUNCATE
   * guards stay: both tables carry them until abort or finalize removes them.
   */
  stopSql(m: Migration): string[];
  /** Statements that remove what the mirror left behind for good (functions, slots). */
  dropSql(m: Migration): string[];
  health(sql: AnySql, m: Migration): Promise<MirrorHealth>;
  /**
   * Whether the copy follows a replication stream now, so that a command needing every committed change in the
   * copy (backfill's catch-up, verify, the first cutover) must wait for it (follow). Trigger mode: never (the
   * mirror writes in the application's transaction); logical mode: isStreaming (state.ts).
   */
  streams(m: Migration): m is StreamingMigration;
  /**
   * Starts following the stream of `m`: applies it in this process, or watches the slot's consumer
   * (`pgshift sync`) apply it (followStream, stream.ts); the caller stops the follower. Null when `streams(m)`
   * is false: there is nothing to wait for.
   */
  follow(sql: Sql, m: Migration): Promise<StreamFollower | null>;
}

/** Row triggers on the live table writing into the copy in the application's transaction. */
export const triggerMirror: Mirror = {
  mode: "trigger",
  startSql(m) {
    // Before cutover the copy is the shadow, keyed by (key + partition column), and the mirror upserts (a
    // backfill batch may have written the row already). After, the copy is the retired table, keyed by the
    // original key, which may have GENERATED ALWAYS identity columns: the mirror inserts and updates without
    // ever overwriting, so the retired table's unique indexes refuse a key the partitioned table accepts
    // (the original key with another partition value) in the application's transaction, and swap-back
    // never loses the row it would have overwritten.
    const after = partitionedIsLive(m.phase);
    const always = m.sequences.filter((s) => s.identity === "a").map((s) => s.column);
    return installTriggerMirrorSql({
      fn: m.mirrorFn,
      from: m.live,
      to: m.copy,
      columns: m.copy_columns,
      key: after ? m.key_columns : m.shadow_key,
      overridingSystemValue: after && always.length > 0,
      writes: after ? "strict" : "upsert",
      alwaysIdentity: after ? always : [],
    });
  },
  stopSql(m) {
    return removeMirrorTriggerSql(m.live);
  },
  dropSql(m) {
    return [`DROP FUNCTION IF EXISTS ${quoteQualified(m.mirrorFn)}()`];
  },
  async health(sql, m) {
    const r = await sql`
      select t.tgname::text as name, t.tgenabled::text as enabled from pg_trigger t
       where t.tgrelid = to_regclass(${quoteQualified(m.live)}) and t.tgname in (${MIRROR_TRIGGER},
         ${TRUNCATE_TRIGGER})`;
    const mirror = r.find((x) => x.name === MIRROR_TRIGGER);
    const guard = r.find((x) => x.name === TRUNCATE_TRIGGER);
    const ok = Boolean(mirror && mirror.enabled !== "D" && guard);
    const route = `${m.live.schema}.${m.live.name} -> ${m.copy.schema}.${m.copy.name}`;
    return {
      mode: "trigger",
      ok,
      detail: ok
        ? `row trigger enabled: ${route}`
        : `row trigger ${mirror ? "disabled" : "missing"} on ${m.live.schema}.${m.live.name}: writes are NOT mirrored`,
    };
  },
  streams(_m): _m is StreamingMigration {
    return false;
  },
  async follow() {
    return null;
  },
};

export function mirrorFor(mode: Mode): Mirror {
  switch (mode) {
    case "trigger":
      return triggerMirror;
    case "logical":
      return logicalMirror;
  }
}
