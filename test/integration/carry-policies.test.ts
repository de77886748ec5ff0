import { randomBytes } from "node:crypto";
import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, formatSwitchPlan, swapBack, switchPlan } from "../../src/cutover/cutover.js";
import { compareWithTwin, createWorkload, startLoad, type Workload } from "../../src/load/workload.js";
import { finalize } from "../../src/migration/finish.js";
import { planMigration } from "../../src/migration/plan.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration, type Mode } from "../../src/migration/state.js";
import { quoteQualified } from "../../src/names.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { expectEqualToTwin } from "../support/twin.js";

/**
 * Row-level security follows the live table (issue 15, src/dependents/policies.ts): a table with ENABLE and
 * FORCE ROW LEVEL SECURITY, a tenant policy (and a restrictive one) read by a non-owner role, a reporting role
 * with column grants and a policy of its own, and a role granted SELECT but no policy (deny-all), migrated under
 * the concurrent load of the concurrency test through start, backfill, verify, cutover, swap-back, cutover and
 * finalize, in both mirror modes. At every step, on whichever table is live, the tenant sees exactly its rows
 * (counted against the twin in the same snapshot) and cannot write another tenant's, the reporting role reads
 * its columns and no other, the deny-all role sees nothing. A policy changed and a column granted before the
 * cutover, and a policy created, a column revoked and FORCE removed on the partitioned table after it, follow
 * the table at the next switch.
 */

const suffix = randomBytes(3).toString("hex");
const TENANT = `tenant_${suffix}`;
const REPORT = `reporting_${suffix}`;
const NOBODY = `nobody_${suffix}`;

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
  await db.admin.unsafe(`create role ${TENANT}; create role ${REPORT}; create role ${NOBODY};`);
});
afterAll(async () => {
  await db?.close();
  const root = postgres(inject("pgUrl"), { max: 1, onnotice: () => {} });
  await root.unsafe(`drop role if exists ${TENANT}, ${REPORT}, ${NOBODY}`).catch(() => {});
  await root.end();
});

/** What the roles may do now, per the expectations of the step. */
interface Expect {
  /** The reporting role's policy: every row, or those outside region apac. */
  reportingRows: "all" | "not apac";
  /** Whether the reporting role may read status. */
  reportingStatus: boolean;
  /** The deny-all role sees nothing, or (once a policy for it exists) the emea rows. */
  nobodyRows: "none" | "emea";
  force: boolean;
}

class Rollback extends Error {}

describe.each(["trigger", "logical"] as Mode[])("row-level security follows the live table (%s mirror)", (mode) => {
  it("is enforced on whichever table is live, for every role, at every step", async () => {
    const name = `orders_rls_${mode}`;
    const table = `public.${name}`;
    const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "composite" };
    await createWorkload(db.admin, w, 6000);
    const t = quoteQualified(w.table);
    const tw = quoteQualified(w.twin);
    await db.admin.unsafe(`
      alter table ${t} enable row level security;
      alter table ${t} force row level security;
      create policy tenant_isolation on ${t} for all to ${TENANT}
        using (tenant_id = current_setting('app.tenant')::int);
      create policy tenant_not_rekeyed on ${t} as restrictive for select to ${TENANT}
        using (status is distinct from 'rekeyed');
      comment on policy tenant_isolation on ${t} is 'a tenant sees its rows';
      create policy reporting_read on ${t} for select to ${REPORT} using (true);
      grant select, insert, update, delete on ${t} to ${TENANT};
      grant select (tenant_id, id, region, amount) on ${t} to ${REPORT};
      grant select on ${t} to ${NOBODY};
      grant usage on schema twin to ${TENANT}, ${REPORT}, ${NOBODY};
      grant select on ${tw} to ${TENANT}, ${REPORT}, ${NOBODY};`);
    const spec = parsePartitionSpec("hash:tenant_id:4");
    const p = await planMigration(db.sql, w.table, { spec, mode });
    expect(p.blockers).toEqual([]);
    for (const pol of ["tenant_isolation", "tenant_not_rekeyed", "reporting_read"])
      expect(p.dependents.some((l) => l.startsWith(`policy ${pol} on ${table} (`))).toBe(true);
    expect(p.dependents.some((l) => l.startsWith(`row-level security enabled and forced on ${table}`))).toBe(true);

    const asRole = async <T>(role: string, fn: (tx: postgres.TransactionSql) => Promise<T>): Promise<T> =>
      (await db.admin.begin(async (tx) => {
        await tx.unsafe(`set local role ${role}`);
        await tx`select set_config('app.tenant', '3', true)`;
        return fn(tx);
      })) as T;
    const denied = async (role: string, stmt: string, step: string) => {
      const err = await asRole(role, (tx) => tx.unsafe(stmt)).then(
        () => null,
        (e: unknown) => e as { code?: string; message?: string },
      );
      expect(err?.code, `${step}: ${role} ${stmt}`).toBe("42501");
    };
    const check = async (step: string, e: Expect) => {
      const flags = await db.admin`select relrowsecurity as rls, relforcerowsecurity as force from pg_class
                                   where oid = to_regclass(${table})`;
      expect(flags[0], step).toEqual({ rls: true, force: e.force });
      // the tenant: its rows (not rekeyed ones), none of another tenant's, counted in one snapshot with the twin
      const tn = await asRole(TENANT, (tx) =>
        tx.unsafe(`select (select count(*) from ${t})::int as seen,
                                  (select count(*) from ${t} where tenant_id <> 3)::int as other,
                                  (select count(*) from ${tw} where tenant_id = 3
                                      and status is distinct from 'rekeyed')::int as expected`),
      );
      expect(tn[0]!.other, step).toBe(0);
      expect(tn[0]!.seen, step).toBe(tn[0]!.expected);
      expect(tn[0]!.seen, step).toBeGreaterThan(100);
      // it may write its own rows, not another tenant's (WITH CHECK from USING)
      await asRole(TENANT, async (tx) => {
        await tx.unsafe(`insert into ${t} (tenant_id, created_at) values (3, now())`);
        throw new Rollback();
      }).catch((err: unknown) => {
        if (!(err instanceof Rollback)) throw err;
      });
      await denied(TENANT, `insert into ${t} (tenant_id, created_at) values (4, now())`, step);
      // the reporting role: its columns only
      const visible = e.reportingRows === "all" ? "true" : "region <> 'apac'";
      const rp = await asRole(REPORT, (tx) =>
        tx.unsafe(`select (select count(*) from (select tenant_id, id, region, amount from ${t}) x)::int as seen,
                          (select count(*) from ${tw} where ${visible})::int as expected`),
      );
      expect(rp[0]!.seen, step).toBe(rp[0]!.expected);
      await denied(REPORT, `select note from ${t} limit 1`, step);
      if (e.reportingStatus) await asRole(REPORT, (tx) => tx.unsafe(`select status from ${t} limit 1`));
      else await denied(REPORT, `select status from ${t} limit 1`, step);
      // the role without a policy of its own
      const nb = await asRole(NOBODY, (tx) =>
        tx.unsafe(`select (select count(*) from ${t})::int as seen,
                                  (select count(*) from ${tw} where region = 'emea')::int as emea`),
      );
      expect(nb[0]!.seen, step).toBe(e.nobodyRows === "none" ? 0 : nb[0]!.emea);
    };

    const load = await startLoad(db.url, w, { connections: 3, pauseMs: mode === "logical" ? 3 : 2 });
    const opts = { lockTimeoutMs: 200, retries: 30 };
    try {
      await sleep(200);
      await startMigration(db.sql, w.table, { allowKeyExtension: true, spec, mode, ...opts });
      expect((await backfill(db.sql, w.table, { batchSize: 2000, sleepMs: 20 })).complete).toBe(true);
      expect((await verify(db.sql, w.table, { chunkSize: 4000 })).equal).toBe(true);
      await check("backfilled", { reportingRows: "all", reportingStatus: false, nobodyRows: "none", force: true });
      // changed on the live table during the migration: carried by the cutover
      await db.admin.unsafe(`alter policy reporting_read on ${t} using (region <> 'apac');
                             grant select (status) on ${t} to ${REPORT}`);
      const before: Expect = { reportingRows: "not apac", reportingStatus: true, nobodyRows: "none", force: true };
      await check("changed before cutover", before);
      const dry = formatSwitchPlan(await switchPlan(db.sql, w.table, "cutover", { dryRun: true }));
      expect(dry).toContain(
        `CREATE POLICY "reporting_read" ON "public"."${name}" AS PERMISSIVE FOR SELECT TO ${REPORT} ` +
          `USING ((region <> 'apac'::text));`,
      );
      expect(dry).toContain(`GRANT SELECT ("status") ON "public"."${name}" TO ${REPORT};`);
      const c1 = await cutover(db.sql, w.table, opts);
      expect(c1.statements).toContain(`GRANT SELECT ("status") ON "public"."${name}" TO ${REPORT}`);
      const m1 = (await loadMigration(db.sql, w.table))!;
      await sleep(300);
      await check("cutover", before);
      expect((await verify(db.sql, w.table, { chunkSize: 4000 })).equal).toBe(true);
      // changed on the partitioned table after cutover: carried back by the swap-back
      await db.admin.unsafe(`create policy nobody_emea on ${t} for select to ${NOBODY} using (region = 'emea');
                             revoke select (status) on ${t} from ${REPORT};
                             alter table ${t} no force row level security`);
      const after: Expect = { reportingRows: "not apac", reportingStatus: false, nobodyRows: "emea", force: false };
      await check("changed after cutover", after);
      await swapBack(db.sql, w.table, opts);
      await sleep(300);
      await check("swapped back", after);
      const kind = await db.admin`select relkind::text as k from pg_class where oid = to_regclass(${table})`;
      expect(kind[0]!.k).toBe("r");
      await cutover(db.sql, w.table, opts);
      await sleep(300);
      await check("cutover again", after);
      // the retired table keeps what it had: the mirror writes it regardless
      const kept = await db.admin`select count(*)::int as n from pg_policy where polrelid = to_regclass(
                                    ${quoteQualified(m1.copy)})`;
      expect(kept[0]!.n).toBe(4);
    } finally {
      await load.stop();
    }
    expect(load.stats.errors).toEqual([]);
    expect(load.stats.updates).toBeGreaterThan(50);
    const m = (await loadMigration(db.sql, w.table))!;
    await expectEqualToTwin(db.admin, [m.live], w.twin, "composite");
    expect((await verify(db.sql, w.table)).equal).toBe(true);
    await finalize(db.sql, w.table, { yes: true });
    await check("finalized", { reportingRows: "not apac", reportingStatus: false, nobodyRows: "emea", force: false });
    const comment = await db.admin`select obj_description(oid, 'pg_policy') as c from pg_policy
                                    where polrelid = to_regclass(${table}) and polname = 'tenant_isolation'`;
    expect(comment[0]!.c).toBe("a tenant sees its rows");
    expect(await compareWithTwin(db.admin, w.table, w.twin, "composite")).toMatchObject({
      onlyInTable: 0,
      onlyInTwin: 0,
    });
  });
});
