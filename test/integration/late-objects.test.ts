import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import type { Sql } from "../../src/db.js";
import { PgshiftError } from "../../src/errors.js";
import { compareWithTwin, createWorkload, startLoad, type Workload } from "../../src/load/workload.js";
import { finalize } from "../../src/migration/finish.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration } from "../../src/migration/state.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { type StatusReport, status } from "../../src/status.js";
import { verify } from "../../src/verify/verify.js";
import { type CliResult, describeRun, expectRefusal, runCli } from "../support/cli.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { expectEqualToTwin } from "../support/twin.js";

/**
 * Objects created on a table while it is being migrated (issue 13, item 5): nothing created after `start`
 * is silently left behind by cutover or swap-back.
 * - An index created on the live table is built on the copy before the switch takes its lock (never under
 *   it), is valid on the table the application writes at every step, and has its original name after finalize,
 *   under concurrent writes checked against an independent twin.
 * - A view, a function with a BEGIN ATOMIC body, a trigger and a policy created after start follow the live table
 *   (src/dependents carries them; carry-triggers and carry-policies test the last two under load).
 * - What cannot be carried (a rule) makes cutover (and, created on the partitioned table after cutover, swap-back)
 *   refuse with exit 2, naming it and the statements to run, with nothing changed; status lists it; the
 *   statements of the hint work.
 * - Something created between the check and the lock is caught under the lock and rolled back.
 */

let db: TestDatabase;
const pgshift = (args: string[]) => runCli([...args, "--url", db.url]);
const MONTH_SPEC = "range:created_at:month";
const opts = { lockTimeoutMs: 200, retries: 30 };

beforeAll(async () => {
  db = await freshDatabase();
});

afterAll(async () => {
  await db?.close();
});

async function createOrders(sql: Sql, name: string): Promise<void> {
  await sql.unsafe(
    `
    create table ${name} (id bigserial primary key, created_at timestamptz not null, note text);
    insert into ${name} (created_at, note)
      select timestamptz '2025-01-01 00:00+00' + i * interval '11 hours', 'order ' || i from generate_series(1, 300) ` +
      `i;`,
  );
}

async function startAndBackfill(name: string): Promise<void> {
  await createOrders(db.admin, name);
  await startMigration(
    db.sql,
    { schema: "public", name },
    { spec: parsePartitionSpec(MONTH_SPEC), mode: "trigger", allowKeyExtension: true, ...opts },
  );
  expect((await backfill(db.sql, { schema: "public", name })).complete).toBe(true);
}

/** What a refused step must leave as it was: the phase, the kind and name of each table, their indexes and triggers. */
async function snapshot(name: string) {
  const r = await db.admin`
    select (select phase from pgshift.migrations where source_table = ${name}) as phase,
           (select index_renames::text from pgshift.migrations where source_table = ${name}) as renames,
           (select array_agg(c.relname::text || ':' || c.relkind::text order by c.relname) from pg_class c
             where c.relnamespace = 'public'::regnamespace and c.relname in (${name}, ${`${name}_pgshift_shadow`},
               ${`${name}_pgshift_retired`})) as tables,
           (select array_agg(c.relname::text order by c.relname) from pg_index i join pg_class c on c.oid = i.indexrelid
             where i.indrelid in (to_regclass(${`public.${name}`}), to_regclass(${`public.${name}_pgshift_shadow`}),
               to_regclass(${`public.${name}_pgshift_retired`}))) as indexes,
           (select array_agg(tgname::text order by tgname) from pg_trigger where tgrelid =
             to_regclass(${`public.${name}`}) and not tgisinternal) as triggers`;
  return r[0];
}

/** The status report (what `pgshift status --json` prints), from the library: the CLI's is checked once per test. */
async function statusOf(name: string): Promise<StatusReport> {
  return status(db.sql, { schema: "public", name });
}

/** The statements of a refusal's hint: `run <before> then pgshift <step> <table>, then <after>`. */
function hintStatements(r: CliResult): { before: string; after: string } {
  const hint = r.stderr.split("\n").find((l) => l.startsWith("pgshift: hint: "))!;
  const m = /^pgshift: hint: (?:run (.*) then )?pgshift (?:cutover|swap-back) \S+(?:, then (.*))?$/.exec(hint);
  expect(m, hint).not.toBeNull();
  return { before: m![1] ?? "", after: m![2] ?? "" };
}

/** The table a view reads from (pg_depend), as regclass text. */
async function viewReads(view: string): Promise<string[]> {
  const r = await db.admin`
    select distinct d.refobjid::regclass::text as t from pg_depend d join pg_rewrite w on w.oid = d.objid
     where d.classid = 'pg_rewrite'::regclass and w.ev_class = to_regclass(${view}) and d.refclassid =
       'pg_class'::regclass
       and d.refobjid <> w.ev_class order by 1`;
  return r.map((x) => String(x.t));
}

describe.each(["trigger", "logical"] as const)(
  "an index created on the live table during the migration (%s mode)",
  (mode) => {
    it(
      "is built on the shadow before cutover takes its lock, and is valid on the live table at every step and named " +
        "as created after finalize, under concurrent writes",
      async () => {
        const name = `late_ix_${mode}`;
        const w: Workload = { table: { schema: "public", name }, twin: { schema: "twin", name }, keyKind: "bigint" };
        await createWorkload(db.admin, w, 20_000);
        /** Valid indexes of `table` on exactly these columns, by name. */
        const indexesOn = async (table: string, def: string) =>
          (
            await db.admin`
        select c.relname::text as n, i.indisvalid as valid, i.indisunique as uniq, pg_get_indexdef(i.indexrelid) as def
          from pg_index i join pg_class c on c.oid = i.indexrelid
         where i.indrelid = to_regclass(${table}) and pg_get_indexdef(i.indexrelid) like ${`% USING btree ${def}`}`
          ).map((r) => ({
            name: String(r.n),
            valid: Boolean(r.valid),
            unique: Boolean(r.uniq),
          }));
        const load = await startLoad(db.url, w, { connections: 4, pauseMs: mode === "logical" ? 3 : 1 });
        let beforeLockSeen: { plain: unknown; unique: unknown } | null = null;
        try {
          await sleep(200);
          await startMigration(db.sql, w.table, {
            spec: parsePartitionSpec("range:created_at:month"),
            mode,
            allowKeyExtension: true,
            ...opts,
          });
          expect((await backfill(db.sql, w.table, { batchSize: 2000, sleepMs: 20 })).complete).toBe(true);
          // A deploy adds two indexes while the migration runs (the load keeps writing).
          await db.admin.unsafe(`create index concurrently ${name}_amount on ${name} (amount)`);
          await db.admin.unsafe(`create unique index concurrently ${name}_id_status on ${name} (id, status)`);
          const st = await statusOf(name);
          expect(st.indexDrift).toHaveLength(2);
          expect(st.indexDrift.join("\n")).toContain(
            `index ${name}_amount was created on public.${name} during the migration`,
          );
          expect(st.indexDrift.join("\n")).toContain(
            `cutover builds it there first, before its lock, as ${name}_amount_part`,
          );
          expect(st.indexDrift.join("\n")).toContain(
            `${name}_id_status_part (UNIQUE USING btree (id, status, "created_at")), unique only together with the ` +
              `partition column`,
          );
          expect(st.lateObjects).toEqual([]);
          // The dry run prints the builds it would run, and builds nothing.
          const dry = await pgshift(["cutover", name, "--dry-run"]);
          expect(dry.code, describeRun(dry)).toBe(0);
          expect(dry.stdout).toContain(
            `CREATE INDEX IF NOT EXISTS "${name}_amount_part" ON ONLY "public"."${name}_pgshift_shadow" USING btree ` +
              `(amount);`,
          );
          expect(dry.stdout).toMatch(
            new RegExp(
              `CREATE INDEX CONCURRENTLY IF NOT EXISTS "\\S+" ON "public"."${name}_p\\S+" USING btree \\(amount\\);`,
            ),
          );
          expect(dry.stdout).toContain(
            `CREATE UNIQUE INDEX IF NOT EXISTS "${name}_id_status_part" ON ONLY "public"."${name}_pgshift_shadow" ` +
              `USING btree (id, status, "created_at");`,
          );
          expect(dry.stdout.indexOf(`${name}_amount_part`)).toBeLessThan(dry.stdout.indexOf("LOCK TABLE"));
          expect(await indexesOn(`public.${name}_pgshift_shadow`, "(amount)")).toEqual([]);

          const r = await cutover(db.sql, w.table, {
            ...opts,
            // Before the transaction that locks: both are already there, valid.
            beforeLock: async () => {
              beforeLockSeen = {
                plain: await indexesOn(`public.${name}_pgshift_shadow`, "(amount)"),
                unique: await indexesOn(`public.${name}_pgshift_shadow`, `(id, status, created_at)`),
              };
            },
          });
          expect(beforeLockSeen).toEqual({
            plain: [{ name: `${name}_amount_part`, valid: true, unique: false }],
            unique: [{ name: `${name}_id_status_part`, valid: true, unique: true }],
          });
          expect(r.indexesBuilt.map((b) => [b.name, b.original, b.widened])).toEqual([
            [`${name}_amount_part`, `${name}_amount`, false],
            [`${name}_id_status_part`, `${name}_id_status`, true],
          ]);
          // Every partition has its index, valid and attached.
          const parts = await db.admin`
        select count(*)::int as n, count(*) filter (where exists (
                 select from pg_index i join pg_inherits h on h.inhrelid = i.indexrelid
                  where i.indrelid = p.inhrelid and i.indisvalid and pg_get_indexdef(i.indexrelid) like
                    '% USING btree (amount)'))::int as indexed
          from pg_inherits p where p.inhparent = to_regclass(${`public.${name}`})`;
          expect(parts[0]!.indexed).toBe(parts[0]!.n);
          // Live (partitioned) after cutover: both valid, whatever they are called until finalize.
          expect((await indexesOn(`public.${name}`, "(amount)")).map((i) => i.valid)).toEqual([true]);
          expect((await indexesOn(`public.${name}`, "(id, status, created_at)")).map((i) => i.valid)).toEqual([true]);
          expect((await statusOf(name)).indexDrift).toEqual([]);
          await sleep(300);
          await swapBack(db.sql, w.table, opts);
          // Live (original) again: it kept its indexes.
          expect(await indexesOn(`public.${name}`, "(amount)")).toEqual([
            { name: `${name}_amount`, valid: true, unique: false },
          ]);
          expect((await statusOf(name)).indexDrift).toEqual([]);
          await sleep(300);
          const again = await cutover(db.sql, w.table, opts);
          expect(again.indexesBuilt).toEqual([]);
          expect((await indexesOn(`public.${name}`, "(amount)")).map((i) => i.valid)).toEqual([true]);
          await sleep(300);
        } finally {
          await load.stop();
        }
        expect(load.stats.errors).toEqual([]);
        expect(load.stats.updates).toBeGreaterThan(50);
        const m = (await loadMigration(db.sql, w.table))!;
        expect(m.phase).toBe("cutover");
        await expectEqualToTwin(db.admin, [m.live, m.copy], w.twin, "bigint");
        expect((await verify(db.sql, w.table)).equal).toBe(true);
        await finalize(db.sql, w.table, { yes: true });
        expect(await indexesOn(`public.${name}`, "(amount)")).toEqual([
          { name: `${name}_amount`, valid: true, unique: false },
        ]);
        expect(await indexesOn(`public.${name}`, "(id, status, created_at)")).toEqual([
          { name: `${name}_id_status`, valid: true, unique: true },
        ]);
        expect(await compareWithTwin(db.admin, w.table, w.twin, "bigint")).toMatchObject({
          onlyInTable: 0,
          onlyInTwin: 0,
        });
      },
    );
  },
);

/**
 * Objects created on `table` after start by `create`: carried by the switches (src/dependents), or refused by
 * cutover naming them by `named`; `check` tells whether it acts on the original table again after the round trip;
 * `drop` removes it.
 */
const objects = (table: string) => [
  {
    what: "a view",
    carried: true,
    create: `create view ${table}_v as select id, note from ${table} where note is not null`,
    named: `view public.${table}_v`,
    check: async () => expect(await viewReads(`public.${table}_v`)).toEqual([table]),
    drop: `drop view ${table}_v`,
  },
  {
    what: "a BEGIN ATOMIC function",
    carried: true,
    create: `create function ${table}_count() returns bigint begin atomic select count(*) from ${table}; end`,
    named: `function public.${table}_count()`,
    check: async () => {
      const r = await db.admin`select distinct d.refobjid::regclass::text as t from pg_depend d
                                where d.objid = ${`public.${table}_count()`}::regprocedure and d.refclassid =
                                  'pg_class'::regclass`;
      expect(r.map((x) => x.t)).toEqual([table]);
    },
    drop: `drop function ${table}_count()`,
  },
  {
    what: "a rule",
    carried: false,
    create: `create rule ${table}_notify as on delete to ${table} do also notify ${table}_deleted`,
    named: `rule ${table}_notify on public.${table}`,
    check: async () => {
      const r = await db.admin`select ev_class::regclass::text as t from pg_rewrite where rulename =
        ${`${table}_notify`}`;
      expect(r.map((x) => x.t)).toEqual([table]);
    },
    drop: `drop rule ${table}_notify on ${table}`,
  },
];

describe("a rule created after start", () => {
  it(
    "each makes cutover refuse with exit 2 naming it, nothing changed; status lists it; the statements of the hint " +
      "carry it over and back",
    async () => {
      const name = "late_dep";
      expect(objects(name).filter((x) => !x.carried)).toHaveLength(1);
      await startAndBackfill(name);
      for (const [i, o] of objects(name)
        .filter((x) => !x.carried)
        .entries()) {
        await db.admin.unsafe(o.create);
        const before = await snapshot(name);
        expect(["backfilled", "swapped_back"]).toContain(before?.phase);
        const st = await statusOf(name);
        expect(st.lateObjects, o.what).toHaveLength(1);
        expect(st.lateObjects[0], o.what).toContain(
          `${o.named} depends on public.${name} and would stay with it as ` +
            `public.${name}_pgshift_retired: cutover refuses`,
        );
        if (i === 0) {
          const human = await pgshift(["status", name]);
          expect(human.stdout, o.what).toContain(`warning: ${o.named} depends on public.${name}`);
          const json = await pgshift(["status", name, "--json"]);
          expect((JSON.parse(json.stdout) as StatusReport).lateObjects, o.what).toEqual(st.lateObjects);
        }
        const refused = await pgshift(["cutover", name]);
        expectRefusal(refused, "cannot cut over", o.named, "nothing was changed");
        if (i === 0) expectRefusal(await pgshift(["cutover", name, "--dry-run"]), "cannot cut over", o.named);
        expect(await snapshot(name), o.what).toEqual(before);
        // As the hint says: the statements before, the cutover, the statements after.
        const h = hintStatements(refused);
        if (h.before) await db.admin.unsafe(h.before);
        await cutover(db.sql, { schema: "public", name }, opts);
        if (h.after) await db.admin.unsafe(h.after);
        const after = (await statusOf(name)).lateObjects;
        expect(after.join("\n"), o.what).toContain(
          `${o.named} depends on public.${name} and would stay with it as ` +
            `public.${name}_pgshift_shadow: swap-back refuses`,
        );
        // The object now acts on the partitioned table: swap-back refuses in turn, and its hint moves it back.
        const back = await pgshift(["swap-back", name]);
        expectRefusal(back, "cannot swap back", o.named, "nothing was changed");
        const hb = hintStatements(back);
        if (hb.before) await db.admin.unsafe(hb.before);
        await swapBack(db.sql, { schema: "public", name }, opts);
        if (hb.after) await db.admin.unsafe(hb.after);
        await o.check();
        await db.admin.unsafe(o.drop);
        expect((await statusOf(name)).lateObjects, o.what).toEqual([]);
      }
    },
  );
});

describe("a view and a BEGIN ATOMIC function created after start (carried, src/dependents)", () => {
  it("follow the live table through cutover and swap-back: status lists nothing, no switch refuses", async () => {
    const name = "late_carried";
    await startAndBackfill(name);
    const table = { schema: "public", name };
    for (const o of objects(name).filter((x) => x.carried)) await db.admin.unsafe(o.create);
    expect((await statusOf(name)).lateObjects).toEqual([]);
    /** The relation (regclass text of its oid) each carried object uses now. */
    const uses = async () => {
      const r = await db.admin`
        select (select array_agg(distinct d.refobjid) from pg_depend d join pg_rewrite w on w.oid = d.objid
                 where w.ev_class = to_regclass(${`public.${name}_v`}) and d.refclassid = 'pg_class'::regclass
                   and d.refobjid <> w.ev_class) as view,
               (select array_agg(distinct d.refobjid) from pg_depend d where d.objid =
                 ${`public.${name}_count()`}::regprocedure and d.refclassid = 'pg_class'::regclass) as fn,
               to_regclass(${`public.${name}`})::oid as live`;
      return r[0]!;
    };
    const original = (await uses()).live;
    await cutover(db.sql, table, opts);
    let u = await uses();
    expect(u.live).not.toEqual(original);
    expect(u.view).toEqual([u.live]);
    expect(u.fn).toEqual([u.live]);
    const counted = await db.admin.unsafe(`select ${name}_count() as n`);
    expect(Number(counted[0]?.n)).toBe(300);
    // Created on the partitioned table after cutover: carried back by swap-back too.
    await db.admin.unsafe(`create view ${name}_v3 as select id from ${name}`);
    await swapBack(db.sql, table, opts);
    u = await uses();
    expect(u.live).toEqual(original);
    expect(u.view).toEqual([original]);
    expect(u.fn).toEqual([original]);
    for (const o of objects(name).filter((x) => x.carried)) await o.check();
    expect(await viewReads(`public.${name}_v3`)).toEqual([name]);
    expect((await statusOf(name)).lateObjects).toEqual([]);
  });
});

describe("objects created on the partitioned live table after cutover", () => {
  it(
    "swap-back builds an index on the retired table before its lock, and refuses for a rule, " +
      "naming each, nothing changed",
    async () => {
      const name = "late_back";
      await startAndBackfill(name);
      await cutover(db.sql, { schema: "public", name }, opts);
      // The application's deploy adds an index to the (now partitioned) live table.
      await db.admin.unsafe(`create index late_back_note on ${name} (note)`);
      const st = await statusOf(name);
      expect(st.indexDrift).toHaveLength(1);
      expect(st.indexDrift[0]).toContain(`index late_back_note was created on public.${name} during the migration`);
      expect(st.indexDrift[0]).toContain(`swap-back builds it there first, before its lock, as late_back_note_orig`);
      for (const [i, o] of objects(name)
        .filter((x) => !x.carried)
        .entries()) {
        await db.admin.unsafe(o.create);
        const before = await snapshot(name);
        expect(before?.phase).toBe("cutover");
        const s = await statusOf(name);
        expect(s.lateObjects.join("\n"), o.what).toContain(
          `${o.named} depends on public.${name} and would stay with it as ` +
            `public.${name}_pgshift_shadow: swap-back refuses`,
        );
        const refused = await pgshift(["swap-back", name]);
        expectRefusal(refused, "cannot swap back", o.named, "nothing was changed");
        if (i === 0) expectRefusal(await pgshift(["swap-back", name, "--dry-run"]), "cannot swap back", o.named);
        // Nothing changed: not even the index was built (the refusal comes first).
        expect(await snapshot(name), o.what).toEqual(before);
        const h = hintStatements(refused);
        if (h.before) await db.admin.unsafe(h.before);
      }
      const dry = await pgshift(["swap-back", name, "--dry-run"]);
      expect(dry.code, describeRun(dry)).toBe(0);
      expect(dry.stdout.split("\n").find((l) => !l.startsWith("--"))).toBe(
        `CREATE INDEX CONCURRENTLY IF NOT EXISTS "late_back_note_orig" ON "public"."${name}_pgshift_retired" USING ` +
          `btree (note);`,
      );
      const back = await pgshift(["swap-back", name]);
      expect(back.code, describeRun(back)).toBe(0);
      expect(back.stdout).toContain(
        `built index late_back_note_orig on public.${name}_pgshift_retired before the lock, for index late_back_note`,
      );
      const ix = await db.admin`
      select c.relname::text as n, i.indisvalid as valid from pg_index i join pg_class c on c.oid = i.indexrelid
       where i.indrelid = to_regclass(${`public.${name}`}) and pg_get_indexdef(i.indexrelid) like
         '% USING btree (note)'`;
      expect(ix.map((r) => [r.n, r.valid])).toEqual([["late_back_note_orig", true]]);
      const st2 = await statusOf(name);
      expect(st2.phase).toBe("swapped_back");
      expect(st2.indexDrift).toEqual([]);
    },
  );
});

describe("a trigger and a policy created during the migration", () => {
  it(
    "are carried over by cutover and swap-back without a refusal; one dropped while live leaves the other table at " +
      "the next switch; another table's policy reading the table is refused by name",
    async () => {
      const name = "late_trgpol";
      await startAndBackfill(name);
      const table = { schema: "public", name };
      const live = `public.${name}`;
      const retired = `public.${name}_pgshift_retired`;
      const triggers = async (rel: string) =>
        (
          await db.admin`select tgname::text as n, tgenabled::text as e from pg_trigger
                          where tgrelid = to_regclass(${rel}) and tgname like 'late\\_%' order by 1`
        ).map((r) => `${String(r.n)}:${String(r.e)}`);
      const policies = async (rel: string) =>
        (await db.admin`select polname::text as n from pg_policy where polrelid = to_regclass(${rel}) order by 1`).map(
          (r) => String(r.n),
        );
      /** A row inserted now: the BEFORE trigger sets its note, on the live table and (mirrored) on the copy. */
      const touched = async (at: string) => {
        await db.admin.unsafe(`insert into ${name} (created_at) values ('${at}')`);
        const r = await db.admin.unsafe(`select note from ${name} where created_at = '${at}'`);
        return r.map((x) => x.note);
      };
      await db.admin.unsafe(`
        create function late_trgpol_touch() returns trigger language plpgsql as $$
          begin new.note := coalesce(new.note, 'touched by ' || TG_ARGV[0]); return new; end $$;
        create trigger late_touch before insert on ${name} for each row execute function late_trgpol_touch('first');
        create policy late_recent on ${name} using (created_at > '2020-01-01');`);
      expect((await statusOf(name)).lateObjects).toEqual([]);
      // Another table's policy reading the table is not carried: refused by name, with its statements.
      await db.admin.unsafe(`create table ${name}_other (id bigint);
        create policy late_other_reads on ${name}_other using (id in (select id from ${name}))`);
      const refused = await pgshift(["cutover", name]);
      expectRefusal(
        refused,
        "cannot cut over",
        `policy late_other_reads on public.${name}_other (it reads public.${name})`,
        "nothing was changed",
      );
      expect(hintStatements(refused).before).toBe(`DROP POLICY "late_other_reads" ON "public"."${name}_other";`);
      await db.admin.unsafe(`drop policy late_other_reads on ${name}_other`);
      await cutover(db.sql, table, opts);
      expect(await triggers(live)).toEqual(["late_touch:O"]);
      expect(await triggers(retired)).toEqual(["late_touch:D"]);
      expect(await policies(live)).toEqual(["late_recent"]);
      expect((await statusOf(name)).lateObjects).toEqual([]);
      expect(await touched("2025-02-01 00:00+00")).toEqual(["touched by first"]);
      // On the partitioned table after cutover: one trigger dropped, another created, a policy created.
      await db.admin.unsafe(`
        drop trigger late_touch on ${name};
        create trigger late_second before insert on ${name} for each row execute function late_trgpol_touch('second');
        create policy late_after on ${name} for select using (true);`);
      expect((await statusOf(name)).lateObjects).toEqual([]);
      await swapBack(db.sql, table, opts);
      expect(await triggers(live)).toEqual(["late_second:O"]);
      expect(await triggers(`public.${name}_pgshift_shadow`)).toEqual(["late_second:D"]);
      expect(await policies(live)).toEqual(["late_after", "late_recent"]);
      expect(await touched("2025-02-02 00:00+00")).toEqual(["touched by second"]);
      await cutover(db.sql, table, opts);
      expect(await triggers(live)).toEqual(["late_second:O"]);
      expect(await triggers(retired)).toEqual(["late_second:D"]);
      expect(await policies(live)).toEqual(["late_after", "late_recent"]);
      const v = await verify(db.sql, table);
      expect(v.equal).toBe(true);
    },
  );
});

describe("an object created between the check and the lock", () => {
  it("is seen under the lock: the switch rolls back and refuses, nothing changed", async () => {
    const name = "late_race";
    await startAndBackfill(name);
    const before = await snapshot(name);
    const table = { schema: "public", name };
    const err = await cutover(db.sql, table, {
      ...opts,
      beforeLock: async () => {
        await db.admin.unsafe(`create view late_race_v as select id from ${name}`);
      },
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PgshiftError);
    expect((err as PgshiftError).message).toContain(
      `cannot cut over: created on public.${name} while cutover prepared: `,
    );
    expect((err as PgshiftError).message).toContain("view late_race_v");
    expect(await snapshot(name)).toEqual(before);
    expect(await viewReads("public.late_race_v")).toEqual([name]);
    // An index created in that window: refused the same way; the next cutover builds it first.
    await db.admin.unsafe(`drop view late_race_v`);
    const err2 = await cutover(db.sql, table, {
      ...opts,
      beforeLock: async () => {
        await db.admin.unsafe(`create index late_race_note on ${name} (note)`);
      },
    }).catch((e: unknown) => e);
    expect((err2 as PgshiftError).message).toContain("index late_race_note");
    expect((await snapshot(name))?.phase).toBe("backfilled");
    const ok = await cutover(db.sql, table, opts);
    expect(ok.indexesBuilt.map((b) => b.original)).toEqual(["late_race_note"]);
    expect((await loadMigration(db.sql, table))?.phase).toBe("cutover");
  });
});

describe("other objects that depend on the live table", () => {
  it(
    "a rule, another table's foreign key (on id: the month spec cannot carry it), a column of its row type, a " +
      "CHECK constraint, extended statistics and a unique constraint make cutover refuse naming each; the hint's " +
      "first statements clear the way; a publication created after start is carried over",
    async () => {
      const name = "late_other";
      await startAndBackfill(name);
      await db.admin.unsafe(`
      create table late_other_log (id bigint, at timestamptz default now());
      create rule late_other_keep as on delete to ${name} do also insert into late_other_log (id) values (old.id);
      create table late_other_child (id int primary key, order_id bigint references ${name} (id));
      create table late_other_snap (id int primary key, snap ${name});
      create publication late_other_pub for table ${name};
      alter table ${name} add constraint late_other_note_len check (length(note) < 1000) not valid;
      create statistics late_other_st (dependencies) on id, note from ${name};
      alter table ${name} add constraint late_other_note_key unique (note);`);
      const before = await snapshot(name);
      const refused = await pgshift(["cutover", name]);
      expectRefusal(
        refused,
        "cannot cut over",
        `rule late_other_keep on public.${name}`,
        "foreign key late_other_child_order_id_fkey on public.late_other_child",
        `column snap of public.late_other_snap (of the row type of public.${name})`,
        `check constraint late_other_note_len on public.${name}`,
        `statistics public.late_other_st on public.${name}`,
        `unique constraint late_other_note_key on public.${name} (UNIQUE (note))`,
        "nothing was changed",
      );
      expect(await snapshot(name)).toEqual(before);
      const st = await statusOf(name);
      expect(st.lateObjects).toHaveLength(6);
      expect(st.lateObjects.join("\n")).not.toContain("late_other_pub");
      // The statements before the cutover (drop, or create on the partitioned table too): then it goes through.
      const h = hintStatements(refused);
      expect(h.before).toContain(
        `ALTER TABLE "public"."${name}_pgshift_shadow" ADD CONSTRAINT "late_other_note_key_part" UNIQUE (note, ` +
          `"created_at")`,
      );
      await db.admin.unsafe(h.before);
      expect((await statusOf(name)).lateObjects).toEqual([]);
      await cutover(db.sql, { schema: "public", name }, opts);
      expect((await loadMigration(db.sql, { schema: "public", name }))?.phase).toBe("cutover");
      // The publication follows the live table (src/dependents/publications.ts).
      const pub = await db.admin`
        select r.prrelid = to_regclass(${`public.${name}`}) as live, c.relkind::text as relkind
          from pg_publication_rel r join pg_publication p on p.oid = r.prpubid join pg_class c on c.oid = r.prrelid
         where p.pubname = 'late_other_pub'`;
      expect(pub).toEqual([{ live: true, relkind: "p" }]);
    },
  );
});

describe("a cutover interrupted while it carried an index over", () => {
  it(
    "resumes: an invalid parent index left behind is completed under its name, a finished one not yet recorded is " +
      "recorded; both carry the original names after finalize",
    async () => {
      const name = "late_resume";
      await startAndBackfill(name);
      const table = { schema: "public", name };
      await db.admin.unsafe(`
      create index late_resume_a on ${name} (note);
      create index late_resume_b on ${name} (created_at, note);
      -- What a cutover killed mid-way leaves: a's parent index ON ONLY the shadow (invalid, no partition attached),
      -- b built completely but not yet recorded in the migration.
      create index late_resume_a_part on only ${name}_pgshift_shadow (note);
      create index late_resume_b_part on ${name}_pgshift_shadow (created_at, note);`);
      const valid =
        await db.admin`select indisvalid as v from pg_index where indexrelid = 'late_resume_a_part'::regclass`;
      expect(valid[0]!.v).toBe(false);
      const r = await cutover(db.sql, table, opts);
      expect(r.indexesBuilt.map((b) => b.name)).toEqual(["late_resume_a_part"]);
      const m = (await loadMigration(db.sql, table))!;
      expect(m.index_renames).toEqual(
        expect.arrayContaining([
          { from: "late_resume_a_part", to: "late_resume_a" },
          { from: "late_resume_b_part", to: "late_resume_b" },
        ]),
      );
      await finalize(db.sql, table, { yes: true });
      const ix = await db.admin`
      select c.relname::text as n, i.indisvalid as v from pg_index i join pg_class c on c.oid = i.indexrelid
       where i.indrelid = to_regclass(${`public.${name}`}) order by 1`;
      expect(ix.map((x) => [x.n, x.v])).toEqual([
        ["late_resume_a", true],
        ["late_resume_b", true],
        [`${name}_pkey`, true],
      ]);
    },
  );
});
