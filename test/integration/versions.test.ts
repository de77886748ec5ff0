import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { type EmbeddedServer, embeddedMajor, startEmbedded } from "../../src/embedded.js";
import { describeRun, expectRefusal, runCli } from "../support/cli.js";

/**
 * Item 9 of issue 13: PostgreSQL 14 to 18 are supported, older servers are refused by plan and start with one
 * line and nothing changed; the tests run on the major PGSHIFT_TEST_PG names.
 */
describe("PostgreSQL versions", () => {
  it("the run's server is the major PGSHIFT_TEST_PG names (default 17)", async () => {
    const provider = inject("pgProvider");
    if (provider === "DATABASE_URL") return; // the server is whatever the URL points at
    const sql = postgres(inject("pgUrl"), { max: 1, onnotice: () => {} });
    try {
      const r = await sql`select current_setting('server_version_num')::int as n`;
      expect(Math.floor(Number(r[0]!.n) / 10000), provider).toBe(embeddedMajor());
    } finally {
      await sql.end();
    }
  });

  describe("PostgreSQL 13", () => {
    let server: EmbeddedServer;
    let sql: postgres.Sql;
    beforeAll(async () => {
      server = await startEmbedded({ major: 13 });
      sql = postgres(server.url, { max: 1, onnotice: () => {} });
      await sql`create table orders (id bigint primary key, created_at timestamptz not null, note text)`;
      await sql`insert into orders select i, now() - i * interval '1 day', 'n' || i from generate_series(1, 100) i`;
    }, 120_000);
    afterAll(async () => {
      await sql?.end();
      await server?.stop();
    });

    /** Everything pgshift could have left: its schema, objects named after it, triggers, slots, publications. */
    const footprint = async () =>
      (
        await sql`
          select (select count(*) from pg_namespace where nspname = 'pgshift')::int as schemas,
                 (select count(*) from pg_class where relname like '%pgshift%')::int as relations,
                 (select count(*) from pg_trigger where tgrelid = 'orders'::regclass and not
                   tgisinternal)::int as triggers,
                 (select count(*) from pg_replication_slots)::int as slots,
                 (select count(*) from pg_publication)::int as publications,
                 (select count(*) from orders)::int as rows`
      )[0];

    it("plan and start (both modes) refuse it with one line, exit 2, nothing changed", async () => {
      const before = await footprint();
      expect(before).toEqual({ schemas: 0, relations: 0, triggers: 0, slots: 0, publications: 0, rows: 100 });
      for (const args of [
        ["plan", "orders", "--partition-by", "range:created_at:month"],
        ["start", "orders", "--partition-by", "range:created_at:month", "--allow-key-extension"],
        ["start", "orders", "--partition-by", "range:created_at:month", "--allow-key-extension", "--mode", "logical"],
      ]) {
        const r = await runCli([...args, "--url", server.url]);
        expectRefusal(r, "PostgreSQL 13.", "not supported", "14 or later");
        expect(r.stdout, describeRun(r)).toBe("");
        expect(await footprint()).toEqual(before);
      }
    });
  });
});
