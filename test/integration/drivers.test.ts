/**
 * The drivers' behaviours that pgshift works around (UPSTREAM in src/driver/upstream.ts): one test per entry,
 * named by its key, that passes while the pinned package behaves so, and checks pgshift's workaround beside it.
 * When an upgrade makes one of these fail, the behaviour changed: the workaround may go, with its entry.
 */
import { spawnSync } from "node:child_process";
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pg from "pg";
import { parse as parseConnectionString } from "pg-connection-string";
import { LogicalReplicationService, type Pgoutput, PgoutputPlugin } from "pg-logical-replication";
import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it, type TestContext } from "vitest";
import { connect, ident, type Sql, transaction } from "../../src/db.js";
import { parseUrlParams, passwordFromFile } from "../../src/driver/conninfo.js";
import { lsnText, ReplicationStream, replicationConfig } from "../../src/driver/replication.js";
import { UPSTREAM, type UpstreamName } from "../../src/driver/upstream.js";
import { isConnectionLoss, PgshiftError } from "../../src/errors.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";
import { startProxy } from "../support/proxy.js";

const require = createRequire(import.meta.url);
const DRIVERS = ["postgres", "pg", "pg-logical-replication", "pg-connection-string", "pgpass"] as const;

let db: TestDatabase;
beforeAll(async () => {
  db = await freshDatabase();
});
afterAll(async () => {
  await db?.close();
});

const covered = new Set<string>();
/** A test of the UPSTREAM entry `name`, named by it. */
function upstream(name: UpstreamName, fn: (ctx: TestContext) => Promise<void> | void, timeout = 60_000): void {
  covered.add(name);
  it(`${name} (${UPSTREAM[name].package})`, fn, timeout);
}

/** Whether `p` settles within `ms`. */
async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let settled = false;
  p.then(
    () => (settled = true),
    () => (settled = true),
  );
  const until = Date.now() + ms;
  while (!settled && Date.now() < until) await sleep(20);
  return settled;
}

/** A TCP server on 127.0.0.1 that calls `onSocket` for each connection; counts them. */
async function tcpServer(onSocket: (s: net.Socket) => void) {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on("error", () => {});
    onSocket(s);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  return {
    port: (server.address() as net.AddressInfo).port,
    accepted: () => sockets.size,
    sockets,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

/** A table `name` with a publication and a pgoutput slot of the same name. */
async function publishedTable(name: string): Promise<void> {
  await db.admin.unsafe(`create table ${name} (id int primary key, at timestamptz, doc jsonb)`);
  await db.admin.unsafe(`create publication ${name} for table ${name}`);
  await db.admin`select pg_create_logical_replication_slot(${name}, 'pgoutput')`;
}

async function dropSlot(name: string): Promise<void> {
  for (let i = 0; i < 50; i++) {
    const rows = await db.admin`select active from pg_replication_slots where slot_name = ${name}`;
    if (rows.length === 0) return;
    if (!rows[0]!.active) {
      await db.admin`select pg_drop_replication_slot(${name})`;
      return;
    }
    await sleep(100);
  }
}

/** A raw pg-logical-replication service on `slot`, as pgshift configures it (no automatic acknowledge). */
async function rawService(flowControl = false) {
  return new LogicalReplicationService(
    { ...(await replicationConfig(db.url)), application_name: `raw_${Math.random().toString(36).slice(2, 8)}` },
    { acknowledge: { auto: false, timeoutSeconds: 0 }, flowControl: { enabled: flowControl } },
  );
}

function plugin(publication: string): PgoutputPlugin {
  return new PgoutputPlugin({ protoVersion: 1, publicationNames: [publication], messages: true });
}

describe("the drivers are pinned", () => {
  it("package.json pins each driver to an exact version, the one installed", () => {
    const pkg = JSON.parse(readFileSync("package.json", "utf8")) as { dependencies: Record<string, string> };
    for (const name of DRIVERS) {
      const pinned = pkg.dependencies[name];
      expect(pinned, name).toMatch(/^\d+\.\d+\.\d+$/);
      const manifest = readFileSync(join("node_modules", name, "package.json"), "utf8");
      const installed = (JSON.parse(manifest) as { version: string }).version;
      expect(installed, name).toBe(pinned);
    }
  });

  it("every entry of UPSTREAM has a test here, and names a pinned driver", () => {
    expect([...covered].sort()).toEqual(Object.keys(UPSTREAM).sort());
    for (const entry of Object.values(UPSTREAM)) expect(DRIVERS).toContain(entry.package);
  });
});

describe("postgres.js", () => {
  upstream("postgresJsSplitsHostOnColon", async () => {
    const raw = postgres({ host: "::1", port: 5432, max: 1 });
    expect(raw.options.host).toEqual([""]);
    await raw.end({ timeout: 0 });
    // connect() passes arrays, taken as they are.
    const sql = await connect({ url: db.url });
    try {
      expect(sql.options.host).toEqual([new URL(db.url).hostname]);
    } finally {
      await sql.end({ timeout: 5 });
    }
  });

  upstream("postgresJsTlsObjectNeverFallsBack", async (ctx) => {
    const [{ ssl }] = (await db.admin`select current_setting('ssl') as ssl`) as unknown as [{ ssl: string }];
    if (ssl !== "off") ctx.skip(`the test server has TLS (ssl=${ssl}): this needs one without`);
    const u = new URL(db.url);
    const opts = { host: u.hostname, port: Number(u.port), user: u.username, pass: u.password, max: 1 };
    const database = u.pathname.slice(1);
    const prefer = postgres({ ...opts, database, ssl: "prefer", connect_timeout: 5 });
    await expect(prefer`select 1 as one`).resolves.toEqual([{ one: 1 }]);
    await prefer.end({ timeout: 5 });
    // TLS options (where a client certificate would go) demand TLS: no fall back to a plain connection.
    const withOptions = postgres({ ...opts, database, ssl: { rejectUnauthorized: false }, connect_timeout: 5 });
    await expect(withOptions`select 1 as one`).rejects.toThrow();
    await withOptions.end({ timeout: 0 }).catch(() => {});
    // connect() with sslmode=prefer and a client certificate asks the server first, then connects without TLS.
    const dir = mkdtempSync(join(tmpdir(), "pgshift-drivers-"));
    try {
      writeFileSync(join(dir, "client.crt"), "not read: the server offers no TLS");
      writeFileSync(join(dir, "client.key"), "not read");
      chmodSync(join(dir, "client.key"), 0o600);
      const url = new URL(db.url);
      url.search = `?sslmode=prefer&sslcert=${join(dir, "client.crt")}&sslkey=${join(dir, "client.key")}`;
      const sql = await connect({ url: url.toString() }).catch((err: unknown) => err);
      if (sql instanceof Error) throw sql;
      await (sql as Sql).end({ timeout: 5 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  upstream("postgresJsReconnectsForEverOnCleanClose", async () => {
    // Something that accepts and closes cleanly (FIN) at once, as a server that is not PostgreSQL may.
    const server = await tcpServer((s) => s.end());
    try {
      const raw = postgres({ host: "127.0.0.1", port: server.port, user: "x", database: "x", connect_timeout: 1 });
      const query = raw`select 1`;
      query.catch(() => {});
      expect(await settlesWithin(query, 3000)).toBe(false);
      expect(server.accepted()).toBeGreaterThan(10);
      void raw.end({ timeout: 0 }).catch(() => {});
      // connect() gives up within connect_timeout (at least 2 s, libpq's rule) with one line.
      const t0 = Date.now();
      const err = await connect({ url: `postgres://x@127.0.0.1:${server.port}/x?connect_timeout=2` }).catch(
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(PgshiftError);
      expect(Date.now() - t0).toBeLessThan(6000);
    } finally {
      await server.close();
    }
  });

  upstream("postgresJsSplitsIdentifiersOnDots", async () => {
    const sql = db.admin;
    await expect(sql`select 1 as ${sql("a.b")}`).rejects.toMatchObject({ code: "42601" });
    const rows = await sql`select 1 as ${ident(sql, "a.b")}`;
    expect(rows.columns.map((c) => c.name)).toEqual(["a.b"]);
  });

  upstream("postgresJsWritesOnClosedReservedConnection", async () => {
    // In a process of its own: the behaviour ends the process.
    const script = `
      import postgres from "postgres";
      const url = process.env.PG_URL, mode = process.env.MODE;
      const admin = postgres(url, { max: 1, onnotice() {} });
      const sql = postgres(url, { max: 1, onnotice() {}, max_lifetime: null, idle_timeout: 0 });
      const kill = async (pid) => {
        await admin\`select pg_terminate_backend(\${pid})\`;
        await new Promise((r) => setTimeout(r, 300));
      };
      if (mode === "begin") {
        await sql.begin(async (tx) => {
          const [{ pid }] = await tx\`select pg_backend_pid() as pid\`;
          await kill(pid);
          throw new Error("fn failed");
        }).catch(() => {});
      } else {
        const r = await sql.reserve();
        const [{ pid }] = await r\`select pg_backend_pid() as pid\`;
        await kill(pid);
        if (mode === "release") { r.release(); await sql\`select 1\`.catch(() => {}); }
        else await r\`select 1\`.catch(() => {});
      }
      await new Promise((r) => setTimeout(r, 500));
      console.log("survived");
      process.exit(0);`;
    for (const mode of ["query", "release", "begin"]) {
      const r = spawnSync(process.execPath, ["--input-type=module", "-e", script], {
        env: { ...process.env, PG_URL: db.url, MODE: mode },
        encoding: "utf8",
        timeout: 30_000,
      });
      expect(r.stdout, mode).not.toContain("survived");
      expect(r.stderr, mode).toMatch(/TypeError: Cannot read properties of null \(reading 'write'\)/);
    }
    // transaction() on a connection terminated inside it: an ordinary error, and this process goes on.
    const sql = await connect({ url: db.url });
    try {
      const err = await transaction(sql, async (tx) => {
        const [{ pid }] = (await tx`select pg_backend_pid() as pid`) as unknown as [{ pid: number }];
        await db.admin`select pg_terminate_backend(${pid})`;
        await sleep(300);
        throw new Error("fn failed");
      }).catch((e: unknown) => e);
      expect((err as Error).message).toBe("fn failed");
      await sleep(500);
      await expect(sql`select 1 as one`).resolves.toEqual([{ one: 1 }]);
    } finally {
      await sql.end({ timeout: 5 });
    }
  });
});

describe("node-postgres", () => {
  upstream("nodePostgresEndWhileConnectingHangs", async () => {
    // A server that accepts and never answers: the client waits for the answer to its startup packet.
    const server = await tcpServer(() => {});
    try {
      const client = new pg.Client({ host: "127.0.0.1", port: server.port, user: "x", database: "x" });
      client.on("error", () => {});
      const connecting = client.connect();
      connecting.catch(() => {});
      while (server.accepted() === 0) await sleep(10);
      await sleep(100);
      const ending = client.end();
      for (const s of server.sockets) s.destroy();
      expect(await settlesWithin(ending, 3000)).toBe(true);
      // The socket is closed, end() resolved: connect() is left pending.
      expect(await settlesWithin(connecting, 1500)).toBe(false);
    } finally {
      await server.close();
    }
    // ReplicationStream: start() ends when abandoned, stop() is bounded.
    const silent = await tcpServer(() => {});
    try {
      const stream = new ReplicationStream(
        { slot: "none", publication: "none", applicationName: "pgshift test" },
        { host: "127.0.0.1", port: silent.port, user: "x", database: "x" },
        { onMessage: async () => {}, onKeepalive: () => {}, onError: () => {}, onEnd: () => {} },
      );
      const starting = stream.start();
      starting.catch(() => {});
      while (silent.accepted() === 0) await sleep(10);
      const why = new Error("given up");
      stream.abandonStart(why);
      await expect(starting).rejects.toBe(why);
      expect(await settlesWithin(stream.stop(), 8000)).toBe(true);
    } finally {
      await silent.close();
    }
  });

  upstream("nodePostgresTerminationHasNoCode", async () => {
    // The connection cut without a word from the server (a network failure), as a TCP proxy closing does.
    const proxy = await startProxy(db.url, { holdReplication: false });
    try {
      // As pg-logical-replication opens it.
      const config = { ...(await replicationConfig(proxy.url)), replication: "database" } as pg.ClientConfig;
      const client = new pg.Client(config);
      const failed = new Promise<Error>((resolve) => client.on("error", resolve));
      await client.connect();
      await proxy.close();
      const err = await failed;
      expect(err.message).toMatch(/^Connection terminated unexpectedly$/);
      expect((err as { code?: unknown }).code).toBeUndefined();
      expect(isConnectionLoss(err)).toBe(true);
      await client.end().catch(() => {});
    } finally {
      await proxy.close().catch(() => {});
    }
  });
});

describe("pg-logical-replication", () => {
  upstream("pgLogicalReplicationAcknowledgeAddsOne", async () => {
    await publishedTable("ack_one");
    const service = await rawService();
    const appName = (service as unknown as { clientConfig: { application_name: string } }).clientConfig
      .application_name;
    service.on("error", () => {});
    const started = new Promise<void>((r) => service.once("start", () => r()));
    const running = service.subscribe(plugin("ack_one"), "ack_one").catch(() => {});
    await started;
    const reported = async (): Promise<bigint> => {
      for (let i = 0; i < 100; i++) {
        const rows = await db.admin`
          select (flush_lsn - '0/0'::pg_lsn)::text as flush from pg_stat_replication
           where application_name = ${appName}`;
        const flush = rows[0]?.flush as string | null | undefined;
        if (flush !== undefined && flush !== null && BigInt(flush) >= target) return BigInt(flush);
        await sleep(50);
      }
      throw new Error("the walsender never showed the reported position");
    };
    const slots = await db.admin`
      select (confirmed_flush_lsn - '0/0'::pg_lsn)::text as lsn from pg_replication_slots where slot_name = 'ack_one'`;
    const lsn = slots[0]!.lsn as string;
    let target = BigInt(lsn);
    await service.acknowledge(lsnText(target));
    expect(await reported()).toBe(target + 1n);
    await service.stop();
    await running;
    // ReplicationStream.confirm(pos) reports pos itself.
    const stream = new ReplicationStream(
      { slot: "ack_one", publication: "ack_one", applicationName: appName },
      await replicationConfig(db.url),
      { onMessage: async () => {}, onKeepalive: () => {}, onError: () => {}, onEnd: () => {} },
    );
    await stream.start();
    target += 2n;
    await stream.confirm(target);
    expect(await reported()).toBe(target);
    await stream.stop();
    await dropSlot("ack_one");
  });

  upstream("pgLogicalReplicationQueueIsPrivate", async () => {
    await publishedTable("queue_private");
    let release: () => void = () => {};
    const gate = new Promise<void>((r) => (release = r));
    let handed = 0;
    // Messages are queued when several arrive in one read: the server's bytes are held here, then handed over
    // in one write (the library pauses the socket while it handles a message, so later reads wait).
    const held = { on: false, chunks: [] as Buffer[], bytes: 0 };
    const target = new URL(db.url);
    const toClient = new Set<net.Socket>();
    const relay = await tcpServer((client) => {
      const server = net.connect(Number(target.port), target.hostname);
      server.on("error", () => client.destroy());
      toClient.add(client);
      client.on("data", (b: Buffer) => server.write(b));
      client.on("close", () => server.destroy());
      server.on("data", (b: Buffer) => {
        if (!held.on) return void client.write(b);
        held.chunks.push(b);
        held.bytes += b.length;
      });
    });
    const relayUrl = new URL(db.url);
    relayUrl.port = String(relay.port);
    const stream = new ReplicationStream(
      { slot: "queue_private", publication: "queue_private", applicationName: "pgshift queue test" },
      await replicationConfig(relayUrl.toString()),
      {
        onMessage: async () => {
          handed++;
          await gate;
        },
        onKeepalive: () => {},
        onError: () => {},
        onEnd: () => {},
      },
    );
    try {
      await stream.start();
      expect(stream.pending()).toEqual({ length: 0, processing: false });
      // One transaction of 1,000 inserts, its messages handed over in one write: the first message (begin) is
      // in hand, those read with it wait in the queue.
      held.on = true;
      await db.admin`insert into queue_private (id) select g from generate_series(1, 1000) g`;
      // At least 20 bytes a row change (its tag, relation, tuple header and id): wait for all of them.
      for (let i = 0, last = -1; i < 400 && (held.bytes < 20_000 || held.bytes !== last); i++) {
        last = held.bytes;
        await sleep(100);
      }
      expect(held.bytes).toBeGreaterThan(20_000);
      held.on = false;
      for (const c of toClient) c.write(Buffer.concat(held.chunks));
      for (let i = 0; i < 200 && stream.pending().length === 0; i++) await sleep(25);
      expect(handed).toBe(1);
      expect(stream.pending().length).toBeGreaterThan(0);
      expect(stream.pending().processing).toBe(true);
      release();
      // begin, relation, 1,000 inserts, commit.
      for (let i = 0; i < 400 && handed < 1003; i++) await sleep(25);
      expect(handed).toBe(1003);
      expect(stream.pending()).toEqual({ length: 0, processing: false });
    } finally {
      release();
      await stream.stop();
      await relay.close();
      await dropSlot("queue_private");
    }
  });

  upstream("pgLogicalReplicationRefusedStartEmitsNoError", async () => {
    const service = await rawService();
    let errors = 0;
    service.on("error", () => errors++);
    await expect(service.subscribe(plugin("none"), "no_such_slot")).rejects.toMatchObject({ code: "42704" });
    await sleep(300);
    expect(errors).toBe(0);
    await service.stop();
    // ReplicationStream.start() fails with the server's error instead of waiting for ever.
    const stream = new ReplicationStream(
      { slot: "no_such_slot", publication: "none", applicationName: "pgshift refused test" },
      await replicationConfig(db.url),
      { onMessage: async () => {}, onKeepalive: () => {}, onError: () => {}, onEnd: () => {} },
    );
    await expect(stream.start()).rejects.toMatchObject({ code: "42704" });
    await stream.stop();
  });

  upstream("pgLogicalReplicationParsesWithGlobalTypes", async () => {
    await publishedTable("global_types");
    const types = pg.types as unknown as { getTypeParser: (oid: number) => (v: string) => unknown };
    const pgshiftParsers = types.getTypeParser;
    const inserted = (service: LogicalReplicationService) =>
      new Promise<Record<string, unknown>>((resolve) =>
        service.on("data", (_lsn: string, msg: Pgoutput.Message) => {
          if (msg.tag === "insert") resolve(msg.new);
        }),
      );
    // The library asks the process-wide registry for each column's parser.
    types.getTypeParser = () => (v: string) => `parsed ${v}`;
    try {
      const service = await rawService();
      service.on("error", () => {});
      const row = inserted(service);
      const running = service.subscribe(plugin("global_types"), "global_types").catch(() => {});
      await new Promise<void>((r) => service.once("start", () => r()));
      await db.admin`insert into global_types values (1, '2024-01-02 03:04:05.123456+00', '{"a": 1}')`;
      expect(await row).toEqual({ id: "parsed 1", at: "parsed 2024-01-02 03:04:05.123456+00", doc: 'parsed {"a": 1}' });
      await service.stop();
      await running;
    } finally {
      types.getTypeParser = pgshiftParsers;
    }
    // With pgshift's registry (replication.ts), the text as PostgreSQL sent it.
    const service = await rawService();
    service.on("error", () => {});
    const row = inserted(service);
    const running = service.subscribe(plugin("global_types"), "global_types").catch(() => {});
    await new Promise<void>((r) => service.once("start", () => r()));
    // The slot sends the first insert again (nothing was confirmed).
    expect(await row).toEqual({ id: "1", at: "2024-01-02 03:04:05.123456+00", doc: '{"a": 1}' });
    await service.stop();
    await running;
    await dropSlot("global_types");
  });
});

describe("pg-connection-string and pgpass", () => {
  upstream("pgConnectionStringReadsCertificateFiles", () => {
    const url = "postgres://u@h/db?sslmode=verify-full&sslrootcert=/no/such/root.crt";
    expect(() => parseConnectionString(url)).toThrow(/ENOENT/);
    expect(parseUrlParams(url)).toMatchObject({ host: "h", sslrootcert: "/no/such/root.crt" });
  });

  upstream("pgpassLaterLineWins", async () => {
    const dir = mkdtempSync(join(tmpdir(), "pgshift-pgpass-"));
    const file = join(dir, "pgpass");
    writeFileSync(file, "*:*:*:*:first\n*:*:*:*:second\n");
    chmodSync(file, 0o600);
    const before = process.env.PGPASSFILE;
    process.env.PGPASSFILE = file;
    try {
      const pgpass = require("pgpass") as (conn: object, cb: (password: string | undefined) => void) => void;
      const conn = { host: "h", port: 5432, database: "d", user: "u" };
      expect(await new Promise((resolve) => pgpass(conn, resolve))).toBe("second");
      expect(await passwordFromFile(file, conn, () => {})).toBe("first");
    } finally {
      if (before === undefined) delete process.env.PGPASSFILE;
      else process.env.PGPASSFILE = before;
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
