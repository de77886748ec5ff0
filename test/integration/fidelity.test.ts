import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { backfill } from "../../src/backfill/backfill.js";
import { cutover, swapBack } from "../../src/cutover/cutover.js";
import { finalize } from "../../src/migration/finish.js";
import { planMigration } from "../../src/migration/plan.js";
import { startMigration } from "../../src/migration/start.js";
import { loadMigration } from "../../src/migration/state.js";
import { type QualifiedName, quoteQualified } from "../../src/names.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { verify } from "../../src/verify/verify.js";
import { createLoginRole, freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Issue 13, item 3: the partitioned table keeps the original's semantics exactly, run by a superuser on
 * tables owned by other roles. A fingerprint of everything that makes up those semantics (owner, row
 * security, replica identity, constraints with deferrability and validity, statistics targets and
 * attribute options, extended statistics, index and constraint comments, grants) is read from the catalog
 * for the original before start, and compared with the live table after cutover, after swap-back (the
 * original again), after a second cutover and after finalize; what lives on the partitions (owner, row
 * security, replica identity, attribute options, the CLUSTER mark) is checked on each. The roles act
 * through connections of their own while the steps run: the owner reads and writes, a reader sees what
 * row security lets it see, and the deferred constraint is still deferred.
 */

let db: TestDatabase;
let owner: Awaited<ReturnType<typeof createLoginRole>>;
let reader: Awaited<ReturnType<typeof createLoginRole>>;
let asOwner: postgres.Sql;
let asReader: postgres.Sql;
let serverVersion = 0;

beforeAll(async () => {
  db = await freshDatabase();
  owner = await createLoginRole(db, "fid_owner");
  reader = await createLoginRole(db, "fid_reader");
  asOwner = postgres(owner.url, { max: 2, onnotice: () => {} });
  asReader = postgres(reader.url, { max: 1, onnotice: () => {} });
  serverVersion = Number((await db.admin`select current_setting('server_version_num') as v`)[0]!.v);
  // The superuser runs pgshift; the owners are other roles.
  expect((await db.admin`select rolsuper from pg_roles where rolname = current_user`)[0]!.rolsuper).toBe(true);
});

afterAll(async () => {
  await asOwner?.end({ timeout: 5 });
  await asReader?.end({ timeout: 5 });
  await db?.close();
  await owner?.drop();
  await reader?.drop();
});

const q = quoteQualified;
type Row = Record<string, unknown>;
const plain = (rows: readonly Row[]): Row[] => rows.map((r) => ({ ...r }));

/**
 * The semantics of `rel` as the catalog holds them, in a form that compares equal between the original
 * table and the partitioned one (names, not oids). Indexes and constraints by name.
 */
async function fingerprint(rel: QualifiedName) {
  const oid = `to_regclass(${JSON.stringify(q(rel)).replace(/^"|"$/g, "'")})`;
  void oid;
  const r = q(rel);
  const one = async (query: string) => plain(await db.admin.unsafe(query, [r]));
  return {
    relation: await one(`
      select pg_get_userbyid(c.relowner)::text as owner, c.relrowsecurity, c.relforcerowsecurity,
        c.relreplident::text as replident,
             obj_description(c.oid, 'pg_class') as comment
        from pg_class c where c.oid = $1::regclass`),
    grants: await one(`
      select case when a.grantee = 0 then 'PUBLIC' else pg_get_userbyid(a.grantee)::text end as grantee,
        a.privilege_type::text, a.is_grantable
        from pg_class c, aclexplode(c.relacl) a where c.oid = $1::regclass order by 1, 2`),
    columnGrants: await one(`
      select a.attname::text as col, case when x.grantee = 0 then 'PUBLIC' else pg_get_userbyid(x.grantee)::text end as
        grantee, x.privilege_type::text
        from pg_attribute a, aclexplode(a.attacl) x where a.attrelid = $1::regclass and a.attacl is not null
          order by 1, 2, 3`),
    columns: await one(`
      select a.attname::text as name, nullif(coalesce(a.attstattarget::int, -1), -1) as stattarget,
        a.attoptions::text as options
        from pg_attribute a where a.attrelid = $1::regclass and a.attnum > 0 and not a.attisdropped order by a.attnum`),
    constraints: await one(`
      select conname::text as name, contype::text as type, condeferrable, condeferred, convalidated,
        pg_get_constraintdef(oid) as def,
             obj_description(oid, 'pg_constraint') as comment
        from pg_constraint where conrelid = $1::regclass and contype in ('p', 'u', 'c', 'f') order by conname`),
    indexes: await one(`
      select ic.relname::text as name, i.indisunique, i.indisprimary, i.indimmediate, i.indisreplident,
             obj_description(i.indexrelid, 'pg_class') as comment, substring(pg_get_indexdef(i.indexrelid) from
               ' USING .*$') as def
        from pg_index i join pg_class ic on ic.oid = i.indexrelid where i.indrelid = $1::regclass order by 1`),
    statistics: await one(`
      select n.nspname::text as schema, s.stxname::text as name, pg_get_userbyid(s.stxowner)::text as owner,
        s.stxkind::text as kinds,
             pg_get_statisticsobjdef_columns(s.oid) as columns, nullif(coalesce(s.stxstattarget::int,
               -1), -1) as target,
             obj_description(s.oid, 'pg_statistic_ext') as comment
        from pg_statistic_ext s join pg_namespace n on n.oid = s.stxnamespace where s.stxrelid =
          $1::regclass order by 2`),
  };
}

/**
 * Per partition of `rel`: owner, row security, replica identity (and its index's parent name), attribute options,
 * clustered index's parent.
 */
async function partitionsOf(rel: QualifiedName) {
  return plain(
    await db.admin.unsafe(
      `
      select c.relname::text as name, pg_get_userbyid(c.relowner)::text as owner, c.relrowsecurity,
        c.relforcerowsecurity, c.relreplident::text as replident,
             (select string_agg(a.attname || ':' || a.attoptions::text, ',' order by a.attnum) from pg_attribute a
               where a.attrelid = c.oid and a.attoptions is not null) as options,
             (select string_agg(a.attname || ':' || a.attstattarget::text, ',' order by a.attnum) from pg_attribute a
               where a.attrelid = c.oid and a.attnum > 0 and coalesce(a.attstattarget::int, -1) >= 0) as stattargets,
             (select pc.relname::text from pg_index x join pg_inherits h on h.inhrelid = x.indexrelid join pg_class pc
               on pc.oid = h.inhparent
               where x.indrelid = c.oid and x.indisclustered) as clustered_on,
             (select pc.relname::text from pg_index x join pg_inherits h on h.inhrelid = x.indexrelid join pg_class pc
               on pc.oid = h.inhparent
               where x.indrelid = c.oid and x.indisreplident) as replident_index
        from pg_inherits h join pg_class c on c.oid = h.inhrelid where h.inhparent = $1::regclass order by 1`,
      [q(rel)],
    ),
  );
}

/** start, backfill, cutover, swap-back, cutover, finalize; `check` runs after each step with the step's name. */
async function flow(
  table: QualifiedName,
  spec: string,
  check: (step: string) => Promise<void>,
  opts: { allowKeyExtension?: boolean; mode?: "trigger" | "logical" } = {},
) {
  await startMigration(db.sql, table, {
    spec: parsePartitionSpec(spec),
    allowKeyExtension: opts.allowKeyExtension,
    mode: opts.mode,
  });
  await check("started");
  const bf = await backfill(db.sql, table, { batchSize: 50 });
  expect(bf.complete).toBe(true);
  await check("backfilled");
  for (const step of ["cutover", "swap-back", "second cutover", "finalize"]) {
    if (step === "swap-back") await swapBack(db.sql, table);
    else if (step === "finalize") await finalize(db.sql, table, { yes: true });
    else {
      const v = await verify(db.sql, table);
      expect(v.differences, step).toEqual([]);
      await cutover(db.sql, table);
    }
    await check(step);
  }
}

const SHADOW = (t: QualifiedName): QualifiedName => ({ schema: t.schema, name: `${t.name}_pgshift_shadow` });

describe("a table owned by another role, migrated by a superuser", () => {
  const table: QualifiedName = { schema: "fid", name: "orders" };
  const T = q(table);

  beforeAll(async () => {
    await db.admin.unsafe(`
      create schema fid;
      grant usage, create on schema fid to ${owner.name};
      grant usage on schema fid to ${reader.name};
      create table ${T} (
        id bigint not null, created_at timestamptz not null, email text, code text, qty int, note text,
        constraint orders_pkey primary key (id, created_at),
        constraint orders_email_key unique (email, created_at) deferrable initially deferred,
        constraint orders_code_key unique (code, created_at),
        constraint note_short check (length(note) < 200));
      insert into ${T} select g, timestamptz '2025-01-01 00:00+00' + g * interval '5 hours', 'e' || g, 'c' || g,
                              case when g % 10 = 0 then 0 else g % 7 + 1 end, 'note ' || g
        from generate_series(1, 400) g;
      -- Rows with qty = 0 exist: the check is NOT VALID, as after a rule added to an old table.
      alter table ${T} add constraint qty_positive check (qty > 0) not valid;
      create index orders_note_idx on ${T} (note);
      alter table ${T} cluster on orders_note_idx;
      alter table ${T} replica identity full;
      alter table ${T} alter column qty set statistics 500;
      alter table ${T} alter column email set (n_distinct = -0.8);
      alter table ${T} alter column code set (n_distinct = 350, n_distinct_inherited = 360);
      create statistics fid.orders_qty_code (ndistinct, dependencies) on qty, code from ${T};
      create statistics fid.orders_expr on (lower(email)) from ${T};
      alter statistics fid.orders_qty_code set statistics 250;
      comment on statistics fid.orders_qty_code is 'qty and code go together';
      comment on index fid.orders_note_idx is 'notes, for the support screen';
      comment on index fid.orders_pkey is 'the key';
      comment on constraint orders_email_key on ${T} is 'one email per instant';
      comment on constraint qty_positive on ${T} is 'not for old rows';
      comment on constraint note_short on ${T} is 'short notes';
      alter table ${T} owner to ${owner.name};
      alter statistics fid.orders_qty_code owner to ${owner.name};
      alter statistics fid.orders_expr owner to ${owner.name};
      grant select, insert on ${T} to ${reader.name};
      grant update (note) on ${T} to ${reader.name};
      revoke truncate on ${T} from ${owner.name};
      analyze ${T};`);
  });

  it(
    "keeps owner, constraints (deferrable, NOT VALID, names), replica identity, statistics, comments, grants and " +
      "the CLUSTER mark through every step",
    async () => {
      const before = await fingerprint(table);
      // The fixture is what the test claims it is.
      expect(before.relation).toEqual([
        { owner: owner.name, relrowsecurity: false, relforcerowsecurity: false, replident: "f", comment: null },
      ]);
      expect(before.constraints.find((c) => c.name === "qty_positive")).toMatchObject({ convalidated: false });
      expect(before.constraints.find((c) => c.name === "orders_email_key")).toMatchObject({
        condeferrable: true,
        condeferred: true,
      });
      const violating = Number((await db.admin.unsafe(`select count(*)::int as n from ${T} where qty <= 0`))[0]!.n);
      expect(violating).toBe(40);

      const plan = await planMigration(db.sql, table, { spec: parsePartitionSpec("range:created_at:month") });
      expect(plan.blockers).toEqual([]);
      expect(
        plan.warnings.some((w) => w.includes("clustered on orders_note_idx") && w.includes("CLUSTER mark")),
        plan.warnings.join("\n"),
      ).toBe(true);
      expect(
        plan.afterCopyStatements.some((s) => /ADD CONSTRAINT "qty_positive" CHECK \(\(qty > 0\)\) NOT VALID/.test(s)),
      ).toBe(true);
      expect(plan.afterCopyStatements.at(-1)).toBe(`ANALYZE ${q(SHADOW(table))}`);

      let round = 0;
      /**
       * The owner writes through its own connection (insert, update, delete); the reader reads and updates its column.
       */
      const roles = async (step: string) => {
        const k = ++round;
        await asOwner.begin(async (tx) => {
          await tx.unsafe(`insert into ${T} values (${10000 + k}, now(), 'new${k}', 'newc${k}', 3, 'by the owner')`);
          await tx.unsafe(`update ${T} set note = 'updated ${k}' where id = ${k}`);
          await tx.unsafe(`delete from ${T} where id = ${100 + k}`);
        });
        expect(
          Number((await asOwner.unsafe(`select count(*)::int as n from ${T} where id = ${10000 + k}`))[0]!.n),
          step,
        ).toBe(1);
        expect(Number((await asReader.unsafe(`select count(*)::int as n from ${T}`))[0]!.n), step).toBeGreaterThan(350);
        await asReader.unsafe(`update ${T} set note = 'reader ${k}' where id = ${200 + k}`);
        const refused = await asReader.unsafe(`update ${T} set qty = 5 where id = 1`).then(
          () => "ok",
          (e: { code?: string }) => String(e.code),
        );
        expect(refused, step).toBe("42501");
      };

      const live = async (step: string) => {
        await roles(step);
        const m = await loadMigration(db.sql, table);
        const partitioned = step === "started" || step === "backfilled" || step === "swap-back" ? SHADOW(table) : table;
        if (step === "finalize") expect(m).toBeNull();
        if (step === "started") return;
        // The table the application uses has the original's semantics, every time.
        const now = await fingerprint(table);
        if (step === "swap-back") {
          expect(now, step).toEqual(before);
        } else if (step !== "backfilled") {
          expect(now.relation, step).toEqual(before.relation);
          expect(now.grants, step).toEqual(before.grants);
          expect(now.columnGrants, step).toEqual(before.columnGrants);
          expect(now.columns, step).toEqual(before.columns);
          expect(now.constraints, step).toEqual(before.constraints);
          expect(now.statistics, step).toEqual(before.statistics);
          // Indexes: same names, comments, definitions, deferrability; the CLUSTER mark is on the partitions (below).
          expect(now.indexes, step).toEqual(before.indexes);
        }
        // The partitioned table, whatever its name: owner, row security, replica identity, options, CLUSTER mark on
        // every
        // partition.
        const parts = await partitionsOf(partitioned);
        expect(parts.length, step).toBeGreaterThanOrEqual(4);
        for (const p of parts) {
          expect(p, `${step}: ${String(p.name)}`).toMatchObject({
            owner: owner.name,
            relrowsecurity: false,
            replident: "f",
            options: `email:{n_distinct=-0.8},code:{n_distinct=350,n_distinct_inherited=360}`,
            stattargets: "qty:500",
            clustered_on: step === "finalize" || step.includes("cutover") ? "orders_note_idx" : "orders_note_idx_part",
          });
        }
        // The NOT VALID check did not stop the copy: the old violating rows are there, the constraint still NOT VALID.
        const bad = Number(
          (await db.admin.unsafe(`select count(*)::int as n from ${q(partitioned)} where qty <= 0`))[0]!.n,
        );
        expect(bad, step).toBe(violating);
        const chk = await db.admin.unsafe(
          `select convalidated from pg_constraint where conrelid = '${q(partitioned).replace(/'/g, "''")}'::regclass and
          conname = 'qty_positive'`,
        );
        expect(
          chk.map((r) => r.convalidated),
          step,
        ).toEqual([false]);
        // A new row must pass it, as on the original.
        const rejected = await asOwner.unsafe(`insert into ${T} values (99999, now(), 'x', 'y', 0, 'n')`).then(
          () => "ok",
          (e: { code?: string }) => String(e.code),
        );
        expect(rejected, step).toBe("23514");
      };
      await flow(table, "range:created_at:month", live);
    },
  );

  it("was analyzed after the copy: the partitioned parent has statistics and a last_analyze", async () => {
    // After the flow above the live table is the partitioned one.
    const r = await db.admin.unsafe(`
      select c.reltuples, s.last_analyze, (select count(*)::int from pg_stats where schemaname = 'fid' and tablename =
        'orders' and inherited) as inh_stats
        from pg_class c left join pg_stat_user_tables s on s.relid = c.oid where c.oid = '${T}'::regclass`);
    expect(r[0]!.last_analyze).not.toBeNull();
    expect(Number(r[0]!.inh_stats)).toBeGreaterThan(0);
    if (serverVersion >= 140000) expect(Number(r[0]!.reltuples)).toBeGreaterThan(300);
  });
});

describe("the deferred unique constraint and ON CONFLICT ON CONSTRAINT after cutover", () => {
  const table: QualifiedName = { schema: "public", name: "accounts" };
  const T = q(table);

  beforeAll(async () => {
    await db.admin.unsafe(`
      create table ${T} (
        id bigint not null, region text not null, email text not null, handle text not null, balance int
          not null default 0,
        constraint accounts_pkey primary key (id, region),
        constraint accounts_email_key unique (email, region) deferrable initially deferred,
        constraint accounts_handle_key unique (handle, region));
      insert into ${T} select g, case when g % 2 = 0 then 'eu' else 'us' end, 'a' || g || '@x', 'h' || g, g from
        generate_series(1, 200) g;
      alter table ${T} owner to ${owner.name};`);
  });

  /**
   * Violates the deferred constraint, then fixes it, within one transaction: commits. Violates and does not fix:
   * refused at COMMIT.
   */
  const deferredStill = async (step: string) => {
    await asOwner.begin(async (tx) => {
      await tx.unsafe(`update ${T} set email = 'a2@x' where id =
        4`); // duplicate of row 2 (both 'eu'): allowed until commit
      await tx.unsafe(`update ${T} set email = 'a2-moved@x' where id = 2`);
    });
    await asOwner.unsafe(`update ${T} set email = 'a4@x' where id = 4`);
    await asOwner.unsafe(`update ${T} set email = 'a2@x' where id = 2`);
    let atCommit = "";
    await asOwner
      .begin(async (tx) => {
        await tx.unsafe(`update ${T} set email = 'a2@x' where id = 4`);
        atCommit = "statement accepted";
      })
      .catch((e: { code?: string }) => {
        atCommit += ` / commit refused ${String(e.code)}`;
      });
    expect(atCommit, step).toBe("statement accepted / commit refused 23505");
  };

  /** The upsert an ORM emits on the non-deferrable constraint, and the same error as before on the deferrable one. */
  const upserts = async (step: string, k: number) => {
    const r = await asOwner.unsafe(
      `insert into ${T} (id, region, email, handle, balance) values (${5000 + k}, 'eu', 'up${k}@x', 'h10', 1)
       on conflict on constraint accounts_handle_key do update set balance = ${T}.balance + 1000 returning id, balance`,
    );
    expect(plain(r), step).toEqual([{ id: "10", balance: 10 + 1000 * k }]);
    const err = await asOwner
      .unsafe(
        `insert into ${T} (id, region, email, handle) values (7000, 'eu', 'a6@x', 'hx') on conflict on constraint
          accounts_email_key do nothing`,
      )
      .then(
        () => "accepted",
        (e: { message?: string }) => String(e.message),
      );
    expect(err, step).toBe(
      "ON CONFLICT does not support deferrable unique constraints/exclusion constraints as arbiters",
    );
  };

  it("keeps both constraints under their names: the upsert works, the deferred one is still deferred", async () => {
    await deferredStill("before start");
    await upserts("before start", 1);
    let k = 1;
    await flow(table, "list:region", async (step) => {
      if (step === "started" || step === "backfilled") return;
      await deferredStill(step);
      await upserts(step, ++k);
      const c = plain(
        await db.admin.unsafe(
          `select conname::text as name, condeferrable, condeferred from pg_constraint where conrelid = '${T}'::regclass
            and contype = 'u' order by 1`,
        ),
      );
      expect(c, step).toEqual([
        { name: "accounts_email_key", condeferrable: true, condeferred: true },
        { name: "accounts_handle_key", condeferrable: false, condeferred: false },
      ]);
    });
  });
});

describe("row security enabled and forced, no policy", () => {
  const table: QualifiedName = { schema: "public", name: "secrets" };
  const T = q(table);

  beforeAll(async () => {
    await db.admin.unsafe(`
      create table ${T} (id bigint not null, created_at timestamptz not null, body text, primary key (id, created_at));
      insert into ${T} select g, timestamptz '2025-03-01 00:00+00' + g * interval '3 hours', 'secret ' || g from
        generate_series(1, 300) g;
      alter table ${T} owner to ${owner.name};
      grant select on ${T} to ${reader.name};
      alter table ${T} enable row level security;
      alter table ${T} force row level security;`);
  });

  it(
    "a reader with SELECT sees no row, and nor does the owner, before and after every step; pgshift (superuser) " +
      "copies every row",
    async () => {
      const seen = async (sql: postgres.Sql) => Number((await sql.unsafe(`select count(*)::int as n from ${T}`))[0]!.n);
      expect(await seen(asReader)).toBe(0);
      expect(await seen(asOwner)).toBe(0);
      await flow(table, "range:created_at:month", async (step) => {
        expect(await seen(asReader), step).toBe(0);
        expect(await seen(asOwner), step).toBe(0);
        expect(await seen(db.admin), step).toBe(300);
        const live = plain(
          await db.admin.unsafe(
            `select relrowsecurity, relforcerowsecurity from pg_class where oid = '${T}'::regclass`,
          ),
        );
        expect(live, step).toEqual([{ relrowsecurity: true, relforcerowsecurity: true }]);
        if (step === "started") {
          const shadow = SHADOW(table);
          const parts = await partitionsOf(shadow);
          for (const p of parts)
            expect(p, String(p.name)).toMatchObject({
              relrowsecurity: true,
              relforcerowsecurity: true,
              owner: owner.name,
            });
        }
      });
    },
  );

  it("is refused when the role running pgshift does not bypass row security (the copy would see no row)", async () => {
    const t2: QualifiedName = { schema: "public", name: "secrets2" };
    await db.admin.unsafe(`
      create table ${q(t2)} (id bigint primary key, created_at timestamptz not null);
      alter table ${q(t2)} owner to ${owner.name};
      alter table ${q(t2)} enable row level security;
      alter table ${q(t2)} force row level security;`);
    const asOwnerPgshift = postgres(owner.url, { max: 1, onnotice: () => {} });
    try {
      const plan = await planMigration(asOwnerPgshift as never, t2, { spec: parsePartitionSpec("hash:id:2") });
      expect(plan.blockers.filter((b) => b.includes("row-level security is forced"))).toHaveLength(1);
    } finally {
      await asOwnerPgshift.end({ timeout: 5 });
    }
  });
});

describe("a unique constraint without the partition column", () => {
  const table: QualifiedName = { schema: "public", name: "users" };
  const T = q(table);

  it("is widened, and keeps its name, its deferrability and its comment", async () => {
    await db.admin.unsafe(`
      create table ${T} (id bigint primary key, created_at timestamptz not null, email text not null,
        constraint users_email_key unique (email) deferrable initially deferred);
      comment on constraint users_email_key on ${T} is 'login';
      insert into ${T} select g, timestamptz '2025-01-01 00:00+00' + g * interval '9 hours', 'u' || g from
        generate_series(1, 100) g;`);
    await flow(
      table,
      "range:created_at:month",
      async (step) => {
        if (step === "started") return;
        const rel = step === "backfilled" || step === "swap-back" ? SHADOW(table) : table;
        const c = plain(
          await db.admin.unsafe(
            `select conname::text as name, condeferrable, condeferred, pg_get_constraintdef(oid) as def,
              obj_description(oid, 'pg_constraint') as comment
               from pg_constraint where conrelid = '${q(rel).replace(/'/g, "''")}'::regclass and contype = 'u'`,
          ),
        );
        const name = step === "backfilled" || step === "swap-back" ? "users_email_key_part" : "users_email_key";
        expect(c, step).toEqual([
          {
            name,
            condeferrable: true,
            condeferred: true,
            def: `UNIQUE (email, created_at) DEFERRABLE INITIALLY DEFERRED`,
            comment: "login",
          },
        ]);
      },
      { allowKeyExtension: true },
    );
  });
});

describe("NOT VALID foreign keys", () => {
  it("are kept NOT VALID on PostgreSQL 18, and refused by plan with one line before it", async () => {
    await db.admin.unsafe(`
      create table public.parents (id int primary key);
      insert into public.parents values (1), (2);
      create table public.kids (id bigint not null, created_at timestamptz not null, parent int, primary
        key (id, created_at));
      insert into public.kids select g, timestamptz '2025-01-01 00:00+00' + g * interval '9 hours', case when g % 5 = 0
        then 99 else 1 end from generate_series(1, 50) g;
      alter table public.kids add constraint kids_parent_fkey foreign key (parent) references public.parents (id)
        deferrable not valid;`);
    // PostgreSQL 18 has NOT VALID NOT NULL too (LIKE would copy it as a valid one).
    if (serverVersion >= 180000)
      await db.admin.unsafe(
        `alter table public.kids add column tag text; alter table public.kids add constraint kids_tag_nn not
          null tag not valid;`,
      );
    const table: QualifiedName = { schema: "public", name: "kids" };
    const spec = "range:created_at:month";
    if (serverVersion < 180000) {
      const plan = await planMigration(db.sql, table, { spec: parsePartitionSpec(spec) });
      expect(plan.blockers).toEqual([
        `foreign key kids_parent_fkey is NOT VALID, and PostgreSQL before 18 cannot add a NOT VALID foreign key to a ` +
          `partitioned table (ALTER TABLE ... VALIDATE CONSTRAINT "kids_parent_fkey" first, or drop it)`,
      ]);
      return;
    }
    await flow(table, spec, async (step) => {
      if (step === "started") return;
      const rel = step === "backfilled" || step === "swap-back" ? SHADOW(table) : table;
      const c = plain(
        await db.admin.unsafe(
          `select convalidated, condeferrable from pg_constraint where conrelid = '${q(rel)}'::regclass and conname =
            'kids_parent_fkey'`,
        ),
      );
      expect(c, step).toEqual([{ convalidated: false, condeferrable: true }]);
      const nn = plain(
        await db.admin.unsafe(
          `select convalidated from pg_constraint where conrelid = '${q(rel)}'::regclass and conname = 'kids_tag_nn'`,
        ),
      );
      expect(nn, step).toEqual([{ convalidated: false }]);
      expect(
        Number((await db.admin.unsafe(`select count(*)::int as n from ${q(rel)} where tag is null`))[0]!.n),
        step,
      ).toBe(50);
      expect(
        Number((await db.admin.unsafe(`select count(*)::int as n from ${q(rel)} where parent = 99`))[0]!.n),
        step,
      ).toBe(10);
    });
  });
});

describe("constraints built after the copy while the application writes", () => {
  for (const mode of ["trigger", "logical"] as const) {
    it(
      `${mode} mode: no write of the owner fails, the table equals its twin after every step, the constraints are ` +
        `the original's`,
      async () => {
        const table: QualifiedName = { schema: "public", name: `load_${mode}` };
        const twin: QualifiedName = { schema: "public", name: `load_${mode}_twin` };
        const T = q(table);
        const W = q(twin);
        const cols = "id, created_at, email, code, qty";
        await db.admin.unsafe(`
        create table ${T} (
          id bigint not null, created_at timestamptz not null, email text not null, code text not
            null, qty int not null,
          constraint ${table.name}_pkey primary key (id, created_at),
          constraint ${table.name}_email_key unique (email, created_at) deferrable initially deferred,
          constraint ${table.name}_code_key unique (code, created_at));
        insert into ${T} select g, timestamptz '2025-01-01 00:00+00' + (g % 90) * interval '1 day', 'e' || g, 'c' || g,
          case when g % 9 = 0 then 0 else 1 end
          from generate_series(1, 3000) g;
        alter table ${T} add constraint ${table.name}_qty check (qty > 0) not valid;
        create table ${W} (like ${T});
        insert into ${W} select * from ${T};
        alter table ${T} owner to ${owner.name};
        alter table ${W} owner to ${owner.name};`);
        const before = plain(
          await db.admin.unsafe(
            `select conname::text as name, condeferrable, condeferred, convalidated,
              pg_get_constraintdef(oid) as def from
            pg_constraint where conrelid = '${T}'::regclass order by 1`,
          ),
        );
        let stop = false;
        let n = 0;
        const errors: string[] = [];
        const writer = (async () => {
          const w = postgres(owner.url, { max: 1, onnotice: () => {} });
          try {
            while (!stop && n < 5000) {
              const k = ++n;
              try {
                await w.begin(async (tx) => {
                  for (const t of [T, W]) {
                    await tx.unsafe(
                      `insert into ${t} values (${100000 + k}, timestamptz '2025-01-01 00:00+00' + ${k % 90} * interval
                      '1 day', 'new${k}', 'nc${k}', 2)`,
                    );
                    // Violates the deferred constraint for a moment, then fixes it, in one transaction.
                    // (Rows with qty = 0 break the NOT VALID check: an update of one fails, on the original as on the
                    // partitioned table.)
                    await tx.unsafe(
                      `update ${t} set email = 'e' || (id + 90) where id = ${((k * 7) % 2900) + 1} and qty > 0`,
                    );
                    await tx.unsafe(
                      `update ${t} set email = 'moved${k}', code = 'code${k}', qty = qty + 1 where id =
                      ${((k * 7) % 2900) + 1} and qty > 0`,
                    );
                    await tx.unsafe(`delete from ${t} where id = ${((k * 13) % 2900) + 1}`);
                  }
                });
              } catch (err) {
                errors.push(String((err as Error).message));
              }
            }
          } finally {
            await w.end({ timeout: 5 });
          }
        })();
        const diff = async (step: string) => {
          const r = await db.admin.unsafe(`
          select (select count(*) from (select ${cols} from ${T} except all select ${cols} from ${W}) x)::int as a,
                 (select count(*) from (select ${cols} from ${W} except all select ${cols} from ${T}) x)::int as b`);
          expect({ a: Number(r[0]!.a), b: Number(r[0]!.b) }, step).toEqual({ a: 0, b: 0 });
        };
        try {
          await flow(
            table,
            "range:created_at:month",
            async (step) => {
              await new Promise((r) => setTimeout(r, 150));
              expect(errors, step).toEqual([]);
              if (step === "started") return;
              if (step !== "backfilled" && step !== "swap-back") {
                const now = plain(
                  await db.admin.unsafe(
                    `select conname::text as name, condeferrable, condeferred, convalidated,
                      pg_get_constraintdef(oid) as
                    def from pg_constraint where conrelid = '${T}'::regclass order by 1`,
                  ),
                );
                expect(now, step).toEqual(before);
              }
              if (step === "finalize") {
                stop = true;
                await writer;
                await diff(step);
              }
            },
            { mode },
          );
        } finally {
          stop = true;
          await writer;
        }
        expect(errors).toEqual([]);
        expect(n).toBeGreaterThan(20);
        await diff("the end");
      },
    );
  }
});

describe("replica identity USING INDEX and NOTHING", () => {
  it(
    "is kept on the parent and on each partition (USING INDEX: each partition's copy of the index) through every " +
      "step",
    async () => {
      await db.admin.unsafe(`
      create table public.ri_index (id bigint not null, created_at timestamptz not null, ref text not null,
        primary key (id, created_at), constraint ri_index_ref_key unique (ref, created_at));
      insert into public.ri_index select g, timestamptz '2025-01-01 00:00+00' + g * interval '11 hours', 'r' || g from
        generate_series(1, 200) g;
      alter table public.ri_index replica identity using index ri_index_ref_key;
      create table public.ri_nothing (id bigint not null, created_at timestamptz not null, primary
        key (id, created_at));
      insert into public.ri_nothing select g, timestamptz '2025-01-01 00:00+00' + g * interval '11 hours' from
        generate_series(1, 200) g;
      alter table public.ri_nothing replica identity nothing;`);
      for (const [name, replident, index] of [
        ["ri_index", "i", "ri_index_ref_key"],
        ["ri_nothing", "n", null],
      ] as const) {
        const table: QualifiedName = { schema: "public", name };
        await flow(table, "range:created_at:month", async (step) => {
          if (step === "started" && replident === "i") return; // USING INDEX needs the index, built after the copy
          const rel = step === "started" || step === "backfilled" || step === "swap-back" ? SHADOW(table) : table;
          const parent = plain(
            await db.admin.unsafe(
              `select c.relreplident::text as replident, (select ic.relname::text from pg_index x join pg_class ic on
              ic.oid = x.indexrelid where x.indrelid = c.oid and x.indisreplident) as index
               from pg_class c where c.oid = '${q(rel)}'::regclass`,
            ),
          );
          const shadowName =
            index === null ? null : step === "backfilled" || step === "swap-back" ? `${index}_part` : index;
          expect(parent, `${name} ${step}`).toEqual([{ replident, index: shadowName }]);
          const parts = await partitionsOf(rel);
          expect(parts.length).toBeGreaterThanOrEqual(4);
          for (const p of parts)
            expect({ replident: p.replident, index: p.replident_index }, `${name} ${step} ${String(p.name)}`).toEqual({
              replident,
              index: shadowName,
            });
        });
      }
    },
  );
});
