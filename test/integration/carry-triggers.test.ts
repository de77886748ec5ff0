import { afterAll, beforeAll, describe, expect, it } from "vitest";
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
 * User triggers follow the live table (issue 15, src/dependents/triggers.ts): a table with an updated_at
 * BEFORE UPDATE trigger, an audit AFTER ROW trigger writing to another table, a statement trigger, a WHEN
 * condition, a disabled trigger (that would make every insert fail if it fired), an ENABLE ALWAYS trigger and a
 * deferred constraint trigger, migrated under the concurrent load of the concurrency test through start,
 * backfill, verify, cutover, swap-back, cutover and finalize, in both mirror modes. The twin has the same
 * triggers writing under its own label, in the same transactions: at every step the audit rows of the table
 * equal the twin's (one per application write, none for the mirror's writes into the copy), the statement
 * trigger fired once per statement of the load, the triggers are enabled as they were on the live table and
 * disabled on the copy (partitions too), updated_at changes on update and the copy has the same value (verify).
 * The spec (hash of tenant_id, which the load never changes) moves no row to another partition: such a move
 * fires DELETE and INSERT row triggers instead of UPDATE ones, which plan says.
 */

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
  await db.admin.unsafe(`
    create table audit_log (n bigserial primary key, src text not null, op text not null, tenant_id int,
                            row_id bigint);
    create table stmt_log (n bigserial primary key, src text not null, op text not null);
    create function audit_row() returns trigger language plpgsql as $$
    begin
      if TG_OP = 'DELETE' then
        insert into audit_log (src, op, tenant_id, row_id) values (TG_ARGV[0], TG_OP, OLD.tenant_id, OLD.id);
      else
        insert into audit_log (src, op, tenant_id, row_id) values (TG_ARGV[0], TG_OP, NEW.tenant_id, NEW.id);
      end if;
      return null;
    end $$;
    create function audit_stmt() returns trigger language plpgsql as $$
    begin insert into stmt_log (src, op) values (TG_ARGV[0], TG_OP); return null; end $$;
    create function touch() returns trigger language plpgsql as $$
    begin NEW.updated_at := clock_timestamp(); return NEW; end $$;
    create function boom() returns trigger language plpgsql as $$
    begin raise exception 'the disabled trigger fired on %', TG_TABLE_NAME; end $$;`);
});
afterAll(async () => {
  await db?.close();
});

/** The user triggers of `table` and of each partition, name -> tgenabled (partitions: `partition/name`). */
async function triggerStates(table: string): Promise<Record<string, string>> {
  const rows = await db.admin`
    select case when t.level = 0 then '' else 'partition/' end || g.tgname::text as k, g.tgenabled::text as e
      from (select to_regclass(${table}) as relid, 0 as level
            union all select relid, level from pg_partition_tree(to_regclass(${table})) where level > 0) t
      join pg_trigger g on g.tgrelid = t.relid
     where g.tgname like 't\\_%'
     order by 1`;
  const out: Record<string, string> = {};
  for (const r of rows) {
    const k = String(r.k);
    // every partition carries the same state: one entry for them all, and a mismatch shows as a second value
    out[k] = out[k] && out[k] !== String(r.e) ? `${out[k]},${String(r.e)}` : String(r.e);
  }
  return out;
}

const LIVE_STATES = {
  t_always: "A",
  t_audit: "O",
  t_constraint: "O",
  t_disabled: "D",
  t_stmt: "O",
  t_updated_at: "O",
  t_when: "O",
};
const ROW_TRIGGERS = ["t_always", "t_audit", "t_constraint", "t_disabled", "t_updated_at", "t_when"];
const disabled = (names: string[], prefix = "") => Object.fromEntries(names.map((n) => [`${prefix}${n}`, "D"]));

describe.each(["trigger", "logical"] as Mode[])("user triggers follow the live table (%s mirror)", (mode) => {
  it("fire once per application write on whichever table is live, never for the mirror's writes", async () => {
    const name = `orders_trg_${mode}`;
    const table = `public.${name}`;
    const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "composite" };
    await createWorkload(db.admin, w, 6000);
    await db.admin`truncate audit_log, stmt_log`;
    const t = quoteQualified(w.table);
    const tw = quoteQualified(w.twin);
    await db.admin.unsafe(`
      alter table ${t} add column updated_at timestamptz;
      create trigger t_updated_at before update on ${t} for each row execute function touch();
      create trigger t_audit after insert or update or delete on ${t} for each row execute function audit_row('app');
      comment on trigger t_audit on ${t} is 'one audit row per write';
      create trigger t_stmt after insert or update or delete on ${t} for each statement
        execute function audit_stmt('app');
      create trigger t_when after update on ${t} for each row when (old.status is distinct from new.status)
        execute function audit_row('app-status');
      create trigger t_disabled after insert on ${t} for each row execute function boom();
      alter table ${t} disable trigger t_disabled;
      create trigger t_always after delete on ${t} for each row execute function audit_row('app-always');
      alter table ${t} enable always trigger t_always;
      create constraint trigger t_constraint after insert on ${t} deferrable initially deferred for each row
        execute function audit_row('app-deferred');
      create trigger t_audit after insert or update or delete on ${tw} for each row execute function audit_row('twin');
      create trigger t_stmt after insert or update or delete on ${tw} for each statement
        execute function audit_stmt('twin');
      create trigger t_when after update on ${tw} for each row when (old.status is distinct from new.status)
        execute function audit_row('twin-status');
      create trigger t_always after delete on ${tw} for each row execute function audit_row('twin-always');
      create constraint trigger t_constraint after insert on ${tw} deferrable initially deferred for each row
        execute function audit_row('twin-deferred');`);
    const spec = parsePartitionSpec("hash:tenant_id:4");

    // plan: one line per trigger, no refusal
    const p = await planMigration(db.sql, w.table, { spec, mode });
    expect(p.blockers).toEqual([]);
    for (const g of Object.keys(LIVE_STATES))
      expect(p.dependents.some((l) => l.startsWith(`trigger ${g} on ${table} (`))).toBe(true);

    /**
     * Audit rows and statements of the table and of the twin, compared in one snapshot (the load writes both in
     * the same transactions): rows only on one side, and how many.
     */
    const audit = async () => {
      const r = await db.admin`
        with a as (select replace(src, 'app', 'x') as k, op, tenant_id, row_id from audit_log where src like 'app%'),
             b as (select replace(src, 'twin', 'x') as k, op, tenant_id, row_id from audit_log where src like 'twin%')
        select (select count(*) from (select * from a except all select * from b) x)::int as only_table,
               (select count(*) from (select * from b except all select * from a) x)::int as only_twin,
               (select count(*) from b)::int as rows,
               (select count(*) from stmt_log where src = 'app')::int as app_statements,
               (select count(*) from stmt_log where src = 'twin')::int as twin_statements,
               (select count(*) from b where k = 'x-status')::int as status_rows,
               (select count(*) from b where k = 'x-deferred')::int as deferred_rows`;
      return r[0]!;
    };
    const expectAuditEqual = async (step: string) => {
      const a = await audit();
      expect(a.only_table, `${step}: audit rows the twin has not (a trigger fired twice, or on the copy)`).toBe(0);
      expect(a.only_twin, `${step}: audit rows missing (a trigger did not fire)`).toBe(0);
      expect(a.app_statements, `${step}: statement trigger`).toBe(a.twin_statements);
      return a;
    };
    /** An update of the probe row changes updated_at (the BEFORE trigger fires on the live table). */
    let probe: { tenant: number; id: string } = { tenant: 0, id: "" };
    let probes = 0;
    const touchProbe = async (step: string) => {
      const before = await db.admin.unsafe(`select updated_at from ${t} where tenant_id = $1 and id = $2`, [
        probe.tenant,
        probe.id,
      ]);
      await db.admin.begin(async (tx) => {
        await tx.unsafe(`update ${t} set note = $3 where tenant_id = $1 and id = $2`, [probe.tenant, probe.id, step]);
        await tx.unsafe(`update ${tw} set note = $3 where tenant_id = $1 and id = $2`, [probe.tenant, probe.id, step]);
      });
      probes += 2;
      const after = await db.admin.unsafe(`select updated_at, note from ${t} where tenant_id = $1 and id = $2`, [
        probe.tenant,
        probe.id,
      ]);
      expect(after[0]!.note).toBe(step);
      expect(after[0]!.updated_at, step).not.toBeNull();
      if (before[0]!.updated_at !== null)
        expect((after[0]!.updated_at as Date).getTime(), step).toBeGreaterThan(
          (before[0]!.updated_at as Date).getTime(),
        );
    };

    const load = await startLoad(db.url, w, { connections: 3, pauseMs: mode === "logical" ? 3 : 2 });
    const opts = { lockTimeoutMs: 200, retries: 30 };
    try {
      // a row the load does not own (its keys are read when it starts), in both tables
      await db.admin.begin(async (tx) => {
        const r = await tx.unsafe(
          `insert into ${t} (tenant_id, created_at, region, status, note) values (2, now(), 'emea', 'probe', 'p')
           returning id`,
        );
        probe = { tenant: 2, id: String(r[0]!.id) };
        await tx.unsafe(
          `insert into ${tw} (tenant_id, id, created_at, region, status, note)
           select tenant_id, id, created_at, region, status, note from ${t} where tenant_id = 2 and id = $1`,
          [probe.id],
        );
      });
      probes += 2;
      await sleep(200);
      await startMigration(db.sql, w.table, { allowKeyExtension: true, spec, mode, ...opts });
      const m0 = (await loadMigration(db.sql, w.table))!;
      expect(await triggerStates(quoteQualified(m0.copy)), "the shadow has no user trigger").toEqual({});
      expect((await backfill(db.sql, w.table, { batchSize: 2000, sleepMs: 20 })).complete).toBe(true);
      await touchProbe("backfilled");
      expect((await verify(db.sql, w.table, { chunkSize: 4000 })).equal).toBe(true);
      await expectAuditEqual("backfilled");
      expect(await triggerStates(table)).toEqual(LIVE_STATES);
      expect(await triggerStates(quoteQualified(m0.copy))).toEqual({});

      // cutover --dry-run prints what the cutover runs: each definition, then disabled on the table leaving
      const dry = formatSwitchPlan(await switchPlan(db.sql, w.table, "cutover", { dryRun: true }));
      // read as pgshift reads them (names qualified unless the session's search_path finds them)
      const defs = await db.admin`select pg_get_triggerdef(oid) as d from pg_trigger where tgrelid =
        to_regclass(${table}) and tgname like 't\\_%' order by tgname`;
      expect(defs.length).toBe(Object.keys(LIVE_STATES).length);
      for (const d of defs) expect(dry).toContain(`${String(d.d)};`);
      for (const g of Object.keys(LIVE_STATES).filter((n) => n !== "t_disabled"))
        expect(dry).toContain(`ALTER TABLE "public"."${m0.retired_table}" DISABLE TRIGGER "${g}";`);

      const c1 = await cutover(db.sql, w.table, opts);
      for (const d of defs) expect(c1.statements).toContain(String(d.d));
      const m1 = (await loadMigration(db.sql, w.table))!;
      await sleep(300);
      await touchProbe("cutover");
      await expectAuditEqual("cutover");
      expect(await triggerStates(table)).toEqual({
        ...LIVE_STATES,
        ...Object.fromEntries(ROW_TRIGGERS.map((n) => [`partition/${n}`, LIVE_STATES[n as keyof typeof LIVE_STATES]])),
      });
      expect(await triggerStates(quoteQualified(m1.copy))).toEqual(disabled(Object.keys(LIVE_STATES)));
      expect((await verify(db.sql, w.table, { chunkSize: 4000 })).equal).toBe(true);

      await swapBack(db.sql, w.table, opts);
      const m2 = (await loadMigration(db.sql, w.table))!;
      await sleep(300);
      await touchProbe("swapped back");
      await expectAuditEqual("swapped back");
      expect(await triggerStates(table)).toEqual(LIVE_STATES);
      expect(await triggerStates(quoteQualified(m2.copy))).toEqual({
        ...disabled(Object.keys(LIVE_STATES)),
        ...disabled(ROW_TRIGGERS, "partition/"),
      });
      expect((await verify(db.sql, w.table, { chunkSize: 4000 })).equal).toBe(true);

      await cutover(db.sql, w.table, opts);
      await sleep(300);
      await touchProbe("cutover again");
      await expectAuditEqual("cutover again");
      expect(await triggerStates(quoteQualified(m1.copy))).toEqual(disabled(Object.keys(LIVE_STATES)));
    } finally {
      await load.stop();
    }
    expect(load.stats.errors).toEqual([]);
    expect(load.stats.updates).toBeGreaterThan(50);
    expect(load.stats.deletes).toBeGreaterThan(10);
    const a = await expectAuditEqual("load stopped");
    // one statement per transaction of the load, and the probe's
    const writes = load.stats.inserts + load.stats.updates + load.stats.deletes;
    expect(a.app_statements).toBe(writes + probes / 2);
    expect(a.rows).toBeGreaterThanOrEqual(writes);
    expect(a.status_rows).toBeGreaterThan(0);
    expect(a.deferred_rows).toBeGreaterThanOrEqual(load.stats.inserts);
    const m = (await loadMigration(db.sql, w.table))!;
    await expectEqualToTwin(db.admin, [m.live], w.twin, "composite");
    expect((await verify(db.sql, w.table)).equal).toBe(true);

    await finalize(db.sql, w.table, { yes: true });
    await touchProbe("finalized");
    await db.admin.unsafe(`delete from ${t} where tenant_id = 2 and id = ${probe.id}`);
    await db.admin.unsafe(`delete from ${tw} where tenant_id = 2 and id = ${probe.id}`);
    const f = await expectAuditEqual("finalized");
    expect(f.app_statements).toBe(writes + probes / 2 + 1);
    expect(await triggerStates(table)).toEqual({
      ...LIVE_STATES,
      ...Object.fromEntries(ROW_TRIGGERS.map((n) => [`partition/${n}`, LIVE_STATES[n as keyof typeof LIVE_STATES]])),
    });
    expect(await compareWithTwin(db.admin, w.table, w.twin, "composite")).toMatchObject({
      onlyInTable: 0,
      onlyInTwin: 0,
    });
  });
});
