import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type EmbeddedServer, startEmbedded } from "../../src/embedded.js";
import type { StatusReport } from "../../src/status.js";
import { describeRun, expectRefusal, runCli } from "../support/cli.js";

/**
 * A replication slot PostgreSQL invalidates (max_slot_wal_keep_size: the WAL it held back was removed) can
 * never stream again: the shadow has lost changes for good. status must say so, sync and cutover must refuse
 * with one clear line, and abort must still clean up. A server of its own: the setting is server-wide.
 */

let server: EmbeddedServer;
let admin: postgres.Sql;
const pgshift = (args: string[]) => runCli([...args, "--url", server.url]);

beforeAll(async () => {
  server = await startEmbedded();
  admin = postgres(server.url, { max: 2, onnotice: () => {} });
  await admin`alter system set max_slot_wal_keep_size = '1MB'`;
  await admin`select pg_reload_conf()`;
}, 120_000);

afterAll(async () => {
  await admin?.end({ timeout: 5 });
  await server?.stop();
});

describe("a replication slot invalidated by PostgreSQL", () => {
  it("status reports it, sync and cutover refuse, abort removes everything", async () => {
    await admin.unsafe(`
      create table lost (id bigserial primary key, created_at timestamptz not null, note text);
      insert into lost (created_at, note) select timestamptz '2025-01-01 00:00+00' + i * interval '11 hours', 'n' || i
        from generate_series(1, 200) i;
      create table filler (x text);`);
    expect(
      (
        await pgshift([
          "start",
          "--allow-key-extension",
          "lost",
          "--partition-by",
          "range:created_at:month",
          "--mode",
          "logical",
        ])
      ).code,
    ).toBe(0);
    expect((await pgshift(["backfill", "lost"])).code).toBe(0);
    const healthy = JSON.parse((await pgshift(["status", "lost", "--json"])).stdout) as StatusReport;
    expect(healthy.stream?.invalidated).toBeNull();
    expect(healthy.stream?.walStatus).toMatch(/^(reserved|extended)$/);

    // With no consumer attached, write far more WAL than max_slot_wal_keep_size and checkpoint until
    // PostgreSQL gives up on the slot.
    await admin`update lost set note = 'changed' where id = 1`;
    for (let i = 0; i < 20; i++) {
      await admin`insert into filler select repeat(md5(g::text), 20) from generate_series(1, 20000) g`;
      await admin`select pg_switch_wal()`;
      await admin`checkpoint`;
      const r = await admin`select wal_status from pg_replication_slots`;
      if (r[0]?.wal_status === "lost") break;
    }
    const st = JSON.parse((await pgshift(["status", "lost", "--json"])).stdout) as StatusReport;
    expect(st.stream?.walStatus).toBe("lost");
    expect(st.stream?.invalidated).toMatch(/wal_removed/);
    expect(st.mirror.ok).toBe(false);
    expect(
      st.stream?.warnings.some((w) => w.includes("was invalidated by PostgreSQL") && w.includes("pgshift abort")),
    ).toBe(true);
    const human = await pgshift(["status", "lost"]);
    expect(human.stdout).toContain("INVALIDATED (wal_removed)");

    expectRefusal(await pgshift(["sync", "lost"]), "was invalidated by PostgreSQL (wal_removed)");
    expectRefusal(await pgshift(["cutover", "lost"]), "the mirror is not healthy", "invalidated");
    const phase = await admin`select phase from pgshift.migrations where source_table = 'lost'`;
    expect(phase[0]?.phase).toBe("backfilled");

    const ab = await pgshift(["abort", "lost"]);
    expect(ab.code, describeRun(ab)).toBe(0);
    expect((await admin`select count(*)::int as n from pg_replication_slots`)[0]!.n).toBe(0);
    expect((await admin`select count(*)::int as n from pg_publication`)[0]!.n).toBe(0);
    expect((await admin`select to_regclass('lost_pgshift_shadow') is null as gone`)[0]!.gone).toBe(true);
  });
});
