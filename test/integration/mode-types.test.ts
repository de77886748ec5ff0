import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { abort } from "../../src/migration/finish.js";
import { startMigration } from "../../src/migration/start.js";
import { hasStream, isStreaming, loadMigration, requireStream } from "../../src/migration/state.js";
import { mirrorFor } from "../../src/mirror/mirror.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";
import { freshDatabase, type TestDatabase } from "../support/db.js";

/**
 * Types per mode, as the rows read back give them: a trigger-mode migration never has a stream (a row saying
 * otherwise is refused, not acted on); the mirror of each mode says whether the copy follows a stream and
 * follows it, so no command asks for the mode itself.
 */

let db: TestDatabase;
const table = { schema: "public", name: "typed" };
beforeAll(async () => {
  db = await freshDatabase();
  await db.admin`create table typed (id bigint primary key, created_at timestamptz not null default now())`;
  await db.admin`insert into typed select i, now() - i * interval '1 hour' from generate_series(1, 100) i`;
});
afterAll(async () => {
  await db?.close();
});

describe("a migration's type follows its mode", () => {
  it("trigger mode: no stream; a row naming a slot is refused when read back, and nothing follows it", async () => {
    await startMigration(db.sql, table, {
      allowKeyExtension: true,
      spec: parsePartitionSpec("range:created_at:month"),
    });
    const m = (await loadMigration(db.sql, table))!;
    expect(m.mode).toBe("trigger");
    expect(hasStream(m)).toBe(false);
    expect(isStreaming(m)).toBe(false);
    expect(mirrorFor(m.mode).streams(m)).toBe(false);
    expect(await mirrorFor(m.mode).follow(db.sql, m)).toBeNull();
    expect(() => requireStream(m)).toThrow(/has no replication stream \(trigger mode\)/);

    await db.admin`update pgshift.migrations set slot_name = 'pgshift_bogus' where source_table = 'typed'`;
    await expect(loadMigration(db.sql, table)).rejects.toThrow(
      /is in trigger mode but names a replication slot or publication \(pgshift_bogus, -\)/,
    );
    await db.admin`update pgshift.migrations set slot_name = null where source_table = 'typed'`;
    await abort(db.sql, table);
    expect(await loadMigration(db.sql, table)).toBeNull();
  });

  it("logical mode: streams until cutover; the mirror follows the slot", async () => {
    await startMigration(db.sql, table, {
      allowKeyExtension: true,
      mode: "logical",
      spec: parsePartitionSpec("range:created_at:month"),
    });
    const m = (await loadMigration(db.sql, table))!;
    expect(m.mode).toBe("logical");
    expect(isStreaming(m)).toBe(true);
    expect(requireStream(m).slot_name).toMatch(/^pgshift_/);
    const mirror = mirrorFor(m.mode);
    expect(mirror.streams(m)).toBe(true);
    const follower = await mirror.follow(db.sql, m);
    expect(follower).not.toBeNull();
    await follower!.stop();
    // In a phase after the first cutover the copy follows no stream, whatever the row still names.
    expect(mirror.streams({ ...m, phase: "cutover" })).toBe(false);
    expect(mirror.streams({ ...m, phase: "swapped_back" })).toBe(false);
    await abort(db.sql, table);
  });
});
