/**
 * Connections as psql makes them (libpq's conventions), against real servers: the password file, sslmode with
 * real TLS (a second server with ssl=on, a certificate made with openssl here, pg_hba that rejects every
 * connection without TLS), the service file, connect_timeout against ports that do not speak PostgreSQL, and
 * the CLI's own hygiene (a closed pipe, usage errors). Commands run as the real CLI (a child process) with the
 * environment given explicitly; HOME is a fresh directory, so nothing of the machine's ~/.pgpass or
 * ~/.postgresql counts.
 */
import { execFileSync, spawn } from "node:child_process";
import { chmodSync, chownSync, copyFileSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pg from "pg";
import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, connectionUrl, replicationConfig, type Sql } from "../../src/db.js";
import { type EmbeddedServer, startEmbedded } from "../../src/embedded.js";
import { type CliResult, describeRun, expectRefusal, repoRoot, runCli } from "../support/cli.js";
import { freshDatabase, sleep, type TestDatabase } from "../support/db.js";

let db: TestDatabase;
let work: string;
/** An empty home directory for the CLI: no ~/.pgpass, no ~/.postgresql. */
let home: string;

const PLAN = ["plan", "orders", "--partition-by", "range:created_at:month"];

/** The table plan runs on: (id, created_at) as key, so that nothing about key extension is in the way. */
async function createOrders(sql: Sql | postgres.Sql, name = "orders", hours = 200): Promise<void> {
  await sql.unsafe(`
    create table ${name} (id bigint not null, created_at timestamptz not null, amount int, primary
      key (id, created_at));
    insert into ${name} select g, timestamptz '2026-01-01' - g * interval '1 hour', g from
      generate_series(1, ${hours}) g;`);
}

/** pgshift with only `env` (plus HOME) as its libpq environment. */
function pgshift(args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs?: number): Promise<CliResult> {
  return runCli(args, { env: { HOME: home, ...env }, ...(timeoutMs ? { timeoutMs } : {}) });
}

/** A plan that ran: the server was reached and the login accepted. */
function expectPlanned(r: CliResult): void {
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.stdout, describeRun(r)).toContain("plan for public.orders");
}

/** The JSON log lines of a run (warnings), their `msg`. */
function logMessages(r: CliResult): string[] {
  return r.stderr
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => String((JSON.parse(l) as { msg?: unknown }).msg));
}

beforeAll(async () => {
  db = await freshDatabase();
  await createOrders(db.admin);
  work = mkdtempSync(join(tmpdir(), "pgshift-conn-"));
  home = join(work, "home");
  mkdirSync(home);
});

afterAll(async () => {
  await db?.close();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe("the password file (PGPASSFILE, ~/.pgpass)", () => {
  /** The test database's URL without its password, and the line of a password file that matches it. */
  function parts() {
    const u = new URL(db.url);
    const password = decodeURIComponent(u.password);
    const user = decodeURIComponent(u.username);
    const escaped = password.replace(/\\/g, "\\\\").replace(/:/g, "\\:");
    const line = `${u.hostname}:${u.port}:${u.pathname.slice(1)}:${user}:${escaped}`;
    u.password = "";
    return { url: u.toString(), line, host: u.hostname, port: u.port, user: decodeURIComponent(u.username) };
  }

  it("a 0600 file given by PGPASSFILE gives the password of the first matching line", async () => {
    const { url, line, host, port, user } = parts();
    const file = join(work, "pgpass-0600");
    // A comment, a line for another database (a wrong password: first match wins, it must not match).
    writeFileSync(file, `# pgshift test\n${host}:${port}:some_other_db:${user}:wrong\n${line}\n`);
    chmodSync(file, 0o600);
    expectPlanned(await pgshift([...PLAN, "--url", url], { PGPASSFILE: file }));
    // Without the file, the same URL has no password: the server refuses the login.
    expectRefusal(
      await pgshift([...PLAN, "--url", url], { PGPASSFILE: join(work, "no-such-file") }),
      "authentication failed",
    );
  });

  it("~/.pgpass is read when PGPASSFILE is not set, and wildcards match", async () => {
    const { url, line } = parts();
    const password = line
      .split(/(?<!\\):/)
      .slice(4)
      .join(":");
    const fakeHome = join(work, "home-pgpass");
    mkdirSync(fakeHome);
    writeFileSync(join(fakeHome, ".pgpass"), `*:*:*:*:${password}\n`);
    chmodSync(join(fakeHome, ".pgpass"), 0o600);
    expectPlanned(await runCli([...PLAN, "--url", url], { env: { HOME: fakeHome } }));
  });

  it("a 0644 file is ignored with libpq's warning, and the login fails as without it", async () => {
    const { url, line } = parts();
    const file = join(work, "pgpass-0644");
    writeFileSync(file, `${line}\n`);
    chmodSync(file, 0o644);
    const r = await pgshift([...PLAN, "--url", url], { PGPASSFILE: file });
    expectRefusal(r, "authentication failed");
    expect(logMessages(r), describeRun(r)).toContain(
      `password file "${file}" has group or world access; permissions should be u=rw (0600) or less`,
    );
    // The same file made private is used: the warning was about the mode, nothing else.
    chmodSync(file, 0o600);
    expectPlanned(await pgshift([...PLAN, "--url", url], { PGPASSFILE: file }));
  });

  it("a wrong password from the file says where it came from", async () => {
    const { url, host, port, user } = parts();
    const file = join(work, "pgpass-wrong");
    writeFileSync(file, `${host}:${port}:*:${user}:certainly-not-it\n`);
    chmodSync(file, 0o600);
    const r = await pgshift([...PLAN, "--url", url], { PGPASSFILE: file });
    expectRefusal(r, "authentication failed", `password retrieved from file "${file}"`);
  });
});

describe("connect_timeout: a port that does not speak PostgreSQL fails in time, with one line", () => {
  const servers: Server[] = [];
  const sockets: Socket[] = [];
  /**
   * A TCP server on 127.0.0.1 that accepts and then does `behave` with each connection. Returns its port and
   * the span from the first connection accepted to the last one closed (ms): how long the client waited,
   * whatever node and tsx took to start.
   */
  async function listen(behave: (s: Socket) => void): Promise<{ port: number; waitedMs: () => Promise<number> }> {
    let first = 0;
    let last = 0;
    const srv = createServer((s) => {
      sockets.push(s);
      first ||= performance.now();
      s.on("error", () => {});
      s.on("close", () => (last = performance.now()));
      behave(s);
      // Read (and drop) what the client sends, so that its hang-up is seen (a paused socket never ends).
      s.resume();
    });
    servers.push(srv);
    await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
    // The close reaches this server a moment after the client exited: wait for it (at most 5 s).
    const waitedMs = async () => {
      for (let i = 0; i < 100 && !(first && last); i++) await sleep(50);
      return first && last ? last - first : -1;
    };
    return { port: (srv.address() as { port: number }).port, waitedMs };
  }
  afterAll(async () => {
    for (const s of sockets) s.destroy();
    for (const srv of servers) await new Promise((r) => srv.close(r));
  });

  it("a server that accepts and says nothing: PGCONNECT_TIMEOUT=2 fails after about 2 s, exit 2", async () => {
    const { port, waitedMs } = await listen(() => {});
    const r = await pgshift(
      [...PLAN, "--url", `postgres://u:p@127.0.0.1:${port}/db`],
      { PGCONNECT_TIMEOUT: "2" },
      60_000,
    );
    expectRefusal(r, `no answer from a PostgreSQL server at 127.0.0.1:${port} within 2 s (connect_timeout)`);
    expect(await waitedMs(), describeRun(r)).toBeGreaterThan(1900);
    expect(await waitedMs(), describeRun(r)).toBeLessThan(4000);
  });

  it(
    "a server that answers something else and hangs up (HTTP): fails within connect_timeout, never retries for " +
      "ever",
    async () => {
      for (const sslmode of ["prefer", "disable", "require"]) {
        const { port, waitedMs } = await listen((s) =>
          s.once("data", () => s.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")),
        );
        const r = await pgshift(
          [...PLAN, "--url", `postgres://u:p@127.0.0.1:${port}/db?connect_timeout=2&sslmode=${sslmode}`],
          {},
          60_000,
        );
        expectRefusal(r, `127.0.0.1:${port}`);
        expect(r.stderr, describeRun(r)).toMatch(
          new RegExp(
            String.raw`within 2 s \(connect_timeout\)|does not speak the PostgreSQL protocol ` +
              String.raw`\(it answered "HTTP\/1\.1 400 Bad Request"\)`,
          ),
        );
        expect(await waitedMs(), describeRun(r)).toBeLessThan(4000);
      }
    },
  );

  it("with no connect_timeout anywhere, the wait is 10 s", async () => {
    const { port, waitedMs } = await listen(() => {});
    const r = await pgshift([...PLAN, "--url", `postgres://u:p@127.0.0.1:${port}/db`], {}, 60_000);
    expectRefusal(r, "within 10 s (connect_timeout)");
    expect(await waitedMs(), describeRun(r)).toBeGreaterThan(9900);
    expect(await waitedMs(), describeRun(r)).toBeLessThan(12_000);
  });

  it("an invalid connect_timeout is refused as libpq refuses it", async () => {
    expectRefusal(
      await pgshift([...PLAN, "--url", db.url], { PGCONNECT_TIMEOUT: "soon" }),
      'invalid integer value "soon" for connection option "connect_timeout"',
    );
  });
});

describe("sslmode against a server without TLS (the run's server)", () => {
  it(
    "verify-full with a missing root certificate is refused before connecting (PGSSLROOTCERT, sslrootcert, " +
      "~/.postgresql/root.crt)",
    async () => {
      const missing = join(work, "no-such-root.crt");
      const viaEnv = await pgshift([...PLAN, "--url", db.url], { PGSSLMODE: "verify-full", PGSSLROOTCERT: missing });
      expectRefusal(viaEnv, `root certificate file "${missing}" does not exist`, "sslmode=verify-full");
      const viaUrl = await pgshift([
        ...PLAN,
        "--url",
        `${db.url}?sslmode=verify-ca&sslrootcert=${encodeURIComponent(missing)}`,
      ]);
      expectRefusal(viaUrl, `root certificate file "${missing}" does not exist`, "sslmode=verify-ca");
      const byDefault = await pgshift([...PLAN, "--url", db.url], { PGSSLMODE: "verify-full" });
      expectRefusal(byDefault, `root certificate file "${join(home, ".postgresql", "root.crt")}" does not exist`);
    },
  );

  it("require is refused by a server without TLS; prefer (the default) and disable connect without it", async () => {
    expectRefusal(
      await pgshift([...PLAN, "--url", db.url], { PGSSLMODE: "require" }),
      "does not support SSL, but sslmode=require requires it",
    );
    expectPlanned(await pgshift([...PLAN, "--url", db.url], { PGSSLMODE: "prefer" }));
    expectPlanned(await pgshift([...PLAN, "--url", `${db.url}?sslmode=disable`]));
  });

  it("an unknown sslmode, or a parameter libpq does not know, is refused", async () => {
    expectRefusal(
      await pgshift([...PLAN, "--url", db.url], { PGSSLMODE: "sometimes" }),
      'invalid sslmode value: "sometimes"',
    );
    expectRefusal(
      await pgshift([...PLAN, "--url", `${db.url}?schema=public`]),
      'unsupported connection parameter "schema"',
    );
  });

  it("application_name: PGAPPNAME or the URL's, else pgshift; pgshift's own sessions keep their names", async () => {
    const saved = process.env.PGAPPNAME;
    process.env.PGAPPNAME = "from_pgappname";
    try {
      const a = await connect({ url: db.url });
      const b = await connect({ url: `${db.url}?application_name=from_url` });
      const c = await connect({ url: db.url, applicationName: "pgshift apply x" });
      const name = async (sql: Sql) => (await sql`select current_setting('application_name') as n`)[0]!.n as string;
      expect([await name(a), await name(b), await name(c)]).toEqual(["from_pgappname", "from_url", "pgshift apply x"]);
      // A derived connection (sync's sessions) does not inherit the command's name.
      const d = await connect({ url: connectionUrl(a) });
      expect(await name(d)).toBe("pgshift");
      for (const s of [a, b, c, d]) await s.end();
    } finally {
      if (saved === undefined) delete process.env.PGAPPNAME;
      else process.env.PGAPPNAME = saved;
    }
  });
});

const hasOpenssl = (() => {
  try {
    execFileSync("openssl", ["version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
})();

describe.skipIf(!hasOpenssl)("sslmode against a server with TLS (ssl=on, pg_hba: hostssl only)", () => {
  let srv: EmbeddedServer;
  let certs: string;
  /** postgres://postgres:pw@<host>:port/postgres */
  let base: (host: string) => string;
  let admin: postgres.Sql;

  beforeAll(async () => {
    certs = join(work, "certs");
    mkdirSync(certs);
    const openssl = (...args: string[]) => execFileSync("openssl", args, { cwd: certs, stdio: "pipe" });
    openssl(
      "req",
      "-new",
      "-x509",
      "-days",
      "2",
      "-nodes",
      "-subj",
      "/CN=pgshift test CA",
      "-keyout",
      "ca.key",
      "-out",
      "ca.crt",
    );
    openssl(
      "req",
      "-new",
      "-x509",
      "-days",
      "2",
      "-nodes",
      "-subj",
      "/CN=another CA",
      "-keyout",
      "other.key",
      "-out",
      "other.crt",
    );
    openssl("req", "-new", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr");
    // The certificate names localhost only (no IP address): verify-full to 127.0.0.1 must fail.
    writeFileSync(join(certs, "ext.cnf"), "subjectAltName=DNS:localhost\n");
    openssl(
      "x509",
      "-req",
      "-in",
      "server.csr",
      "-CA",
      "ca.crt",
      "-CAkey",
      "ca.key",
      "-CAcreateserial",
      "-days",
      "2",
      "-extfile",
      "ext.cnf",
      "-out",
      "server.crt",
    );
    // A client certificate and key, for the checks of sslcert / sslkey.
    openssl("req", "-new", "-nodes", "-subj", "/CN=postgres", "-keyout", "client.key", "-out", "client.csr");
    openssl(
      "x509",
      "-req",
      "-in",
      "client.csr",
      "-CA",
      "ca.crt",
      "-CAkey",
      "ca.key",
      "-CAcreateserial",
      "-days",
      "2",
      "-out",
      "client.crt",
    );
    chmodSync(join(certs, "client.key"), 0o600);

    srv = await startEmbedded();
    const plain = postgres(srv.url, { max: 1, onnotice: () => {} });
    const [settings] = await plain<{ data_directory: string; hba_file: string }[]>`
      select current_setting('data_directory') as data_directory, current_setting('hba_file') as hba_file`;
    const dataDir = settings!.data_directory;
    const hbaFile = settings!.hba_file;
    const owner = statSync(dataDir);
    for (const f of ["server.crt", "server.key", "ca.crt"]) {
      copyFileSync(join(certs, f), join(dataDir, f));
      chownSync(join(dataDir, f), owner.uid, owner.gid);
      chmodSync(join(dataDir, f), 0o600);
    }
    writeFileSync(
      hbaFile,
      [
        "hostssl all all 127.0.0.1/32 scram-sha-256",
        "hostssl replication all 127.0.0.1/32 scram-sha-256",
        "hostnossl all all 0.0.0.0/0 reject",
        "hostnossl replication all 0.0.0.0/0 reject",
        "",
      ].join("\n"),
    );
    await plain`alter system set ssl = on`;
    // The server asks for a client certificate signed by ca.crt (and checks it) when the client has one.
    await plain`alter system set ssl_ca_file = 'ca.crt'`;
    await plain`select pg_reload_conf()`;
    await plain.end();
    const u = new URL(srv.url);
    base = (host: string) => `postgres://${u.username}:${u.password}@${host}:${u.port}/postgres`;
    // Reloads are asynchronous: wait until a TLS connection is accepted.
    for (let i = 0; ; i++) {
      admin = postgres(`${base("127.0.0.1")}?sslmode=require`, { max: 2, onnotice: () => {} });
      try {
        await admin`select 1`;
        break;
      } catch (err) {
        await admin.end({ timeout: 0 });
        if (i > 50) throw err;
        await sleep(100);
      }
    }
    await createOrders(admin);
  }, 180_000);

  afterAll(async () => {
    await admin?.end({ timeout: 5 }).catch(() => {});
    await srv?.stop();
  });

  const ca = () => join(certs, "ca.crt");
  const tlsInUse = async (sql: Sql) =>
    (await sql`select ssl from pg_stat_ssl where pid = pg_backend_pid()`)[0]!.ssl as boolean;

  it("a plain connection is rejected by this server (the premise of the other checks)", async () => {
    await expect(connect({ url: `${base("127.0.0.1")}?sslmode=disable` })).rejects.toThrow(/no encryption/);
  });

  it(
    "verify-full with the right root certificate and host name connects over TLS; connectionUrl " + "carries it",
    async () => {
      const sql = await connect({
        url: `${base("localhost")}?sslmode=verify-full&sslrootcert=${encodeURIComponent(ca())}`,
      });
      expect(await tlsInUse(sql)).toBe(true);
      const derived = connectionUrl(sql);
      expect(derived).toContain("sslmode=verify-full");
      const again = await connect({ url: derived });
      expect(await tlsInUse(again)).toBe(true);
      // The replication connection (node-postgres, as pg-logical-replication opens it) gets the same TLS.
      const config = await replicationConfig(derived);
      const repl = new pg.Client({ ...config, replication: "database" } as pg.ClientConfig);
      await repl.connect();
      const ident = await repl.query("IDENTIFY_SYSTEM");
      expect(ident.rows.length).toBe(1);
      await repl.end();
      await again.end();
      await sql.end();
    },
  );

  it(
    "verify-full refuses a host name the certificate does not name, and a certificate from another root; verify-ca " +
      "accepts the first",
    async () => {
      const wrongHost = connect({
        url: `${base("127.0.0.1")}?sslmode=verify-full&sslrootcert=${encodeURIComponent(ca())}`,
      });
      await expect(wrongHost).rejects.toThrow(
        /certificate of the server at 127\.0\.0\.1:\d+ failed verification \(sslmode=verify-full\)/,
      );
      const otherRoot = connect({
        url: `${base("localhost")}?sslmode=verify-full&sslrootcert=${encodeURIComponent(join(certs, "other.crt"))}`,
      });
      await expect(otherRoot).rejects.toThrow(/failed verification/);
      const verifyCa = await connect({
        url: `${base("127.0.0.1")}?sslmode=verify-ca&sslrootcert=${encodeURIComponent(ca())}`,
      });
      expect(await tlsInUse(verifyCa)).toBe(true);
      await verifyCa.end();
    },
  );

  it(
    "require, prefer and allow use TLS without verifying; require with a root certificate verifies it (libpq's " +
      "rule)",
    async () => {
      for (const mode of ["require", "prefer"]) {
        const sql = await connect({ url: `${base("127.0.0.1")}?sslmode=${mode}` });
        expect(await tlsInUse(sql), mode).toBe(true);
        const again = await connect({ url: connectionUrl(sql) });
        expect(await tlsInUse(again), mode).toBe(true);
        await again.end();
        await sql.end();
      }
      // allow: plain first; this server refuses that (hostssl only), so TLS next.
      const allow = await connect({ url: `${base("127.0.0.1")}?sslmode=allow` });
      expect(await tlsInUse(allow)).toBe(true);
      await allow.end();
      const requireWithRoot = connect({
        url: `${base("localhost")}?sslmode=require&sslrootcert=${encodeURIComponent(join(certs, "other.crt"))}`,
      });
      await expect(requireWithRoot).rejects.toThrow(/failed verification \(sslmode=require\)/);
    },
  );

  it("a client certificate is sent, and a key readable by others is refused as libpq refuses it", async () => {
    const cert = encodeURIComponent(join(certs, "client.crt"));
    const key = join(certs, "client.key");
    const sql = await connect({
      url:
        `${base("localhost")}?sslmode=verify-full&sslrootcert=${encodeURIComponent(ca())}` +
        `&sslcert=${cert}&sslkey=${encodeURIComponent(key)}`,
    });
    const [row] = await sql`select client_dn from pg_stat_ssl where pid = pg_backend_pid()`;
    expect(row!.client_dn).toBe("/CN=postgres");
    await sql.end();
    chmodSync(key, 0o644);
    try {
      await expect(
        connect({ url: `${base("localhost")}?sslmode=require&sslcert=${cert}&sslkey=${encodeURIComponent(key)}` }),
      ).rejects.toThrow(
        `private key file "${key}" has group or world access; file must have permissions u=rw (0600) or less if ` +
          `owned by the current user, or permissions u=rw,g=r (0640) or less if owned by root`,
      );
    } finally {
      chmodSync(key, 0o600);
    }
  });

  it(
    "the CLI: verify-full from PGSSLMODE/PGSSLROOTCERT connects; a missing root certificate is refused, not " +
      "ignored",
    async () => {
      expectPlanned(
        await pgshift([...PLAN, "--url", base("localhost")], { PGSSLMODE: "verify-full", PGSSLROOTCERT: ca() }),
      );
      const missing = await pgshift([...PLAN, "--url", base("localhost")], {
        PGSSLMODE: "verify-full",
        PGSSLROOTCERT: join(certs, "missing.crt"),
      });
      expectRefusal(missing, `root certificate file "${join(certs, "missing.crt")}" does not exist`);
      const wrongHost = await pgshift([...PLAN, "--url", base("127.0.0.1")], {
        PGSSLMODE: "verify-full",
        PGSSLROOTCERT: ca(),
      });
      expectRefusal(wrongHost, "failed verification (sslmode=verify-full)");
    },
  );

  it("the CLI: a service from PGSERVICEFILE gives host, port, user, password, sslmode and sslrootcert", async () => {
    const u = new URL(srv.url);
    const file = join(work, "pg_service.conf");
    writeFileSync(
      file,
      [
        "# services for the test",
        "[other]",
        "host=127.0.0.1",
        "[tls]",
        "host=localhost",
        `port=${u.port}`,
        "dbname=postgres",
        `user=${u.username}`,
        `password=${decodeURIComponent(u.password)}`,
        "sslmode=verify-full",
        `sslrootcert=${ca()}`,
        "",
      ].join("\n"),
    );
    expectPlanned(await pgshift(PLAN, { PGSERVICEFILE: file, PGSERVICE: "tls" }));
    // The URL's parameters win over the service's: sslmode=disable is rejected by this server's pg_hba.
    expectRefusal(
      await pgshift([...PLAN, "--url", `postgres://localhost/postgres?service=tls&sslmode=disable`], {
        PGSERVICEFILE: file,
      }),
      "no encryption",
    );
    expectRefusal(
      await pgshift(PLAN, { PGSERVICEFILE: file, PGSERVICE: "nope" }),
      'definition of service "nope" not found',
    );
  });

  it(
    "logical mode over verify-full: the replication stream and sync's sessions use TLS too (pg_hba rejects anything " +
      "else)",
    async () => {
      const url = `${base("localhost")}?sslmode=verify-full&sslrootcert=${encodeURIComponent(ca())}`;
      await createOrders(admin, "events", 2000);
      const spec = ["--partition-by", "range:created_at:month"];
      const start = await pgshift(
        ["start", "--allow-key-extension", "events", ...spec, "--mode", "logical", "--url", url],
        {},
        120_000,
      );
      expect(start.code, describeRun(start)).toBe(0);
      // Writes while the backfill runs reach the shadow only through the stream (the replication connection).
      let writing = true;
      let written = 0;
      const load = (async () => {
        while (writing) {
          await admin`insert into events values (${100_000 + written}, now(), 1)`;
          await admin`update events set amount = amount + 1 where id = ${1 + (written % 2000)}`;
          written++;
          await sleep(5);
        }
      })();
      const backfill = await pgshift(["backfill", "events", "--url", url], {}, 180_000);
      writing = false;
      await load;
      expect(backfill.code, describeRun(backfill)).toBe(0);
      expect(written).toBeGreaterThan(0);
      const verify = await pgshift(["verify", "events", "--url", url], {}, 180_000);
      expect(verify.code, describeRun(verify)).toBe(0);
      const abort = await pgshift(["abort", "events", "--url", url], {}, 120_000);
      expect(abort.code, describeRun(abort)).toBe(0);
    },
  );
});

describe("the CLI's hygiene", () => {
  it("plan | head -1 ends quietly: no EPIPE, no stack trace, exit 0", async () => {
    // Three years of days: the plan (> 200 kB) is still being written when head has gone.
    await createOrders(db.admin, "big", 3 * 365 * 24);
    const script =
      `node --import tsx src/cli/main.ts plan big --partition-by range:created_at:day --url '${db.url}' ` +
      `| head -1; echo "pgshift exit: \${PIPESTATUS[0]}" >&2`;
    const r = await new Promise<{ stdout: string; stderr: string }>((resolve, reject) => {
      const child = spawn("bash", ["-c", script], {
        cwd: repoRoot,
        env: { ...process.env, HOME: home },
        stdio: ["ignore", "pipe", "pipe"],
      });
      let stdout = "";
      let stderr = "";
      child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
      child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
      child.on("error", reject);
      child.on("close", () => resolve({ stdout, stderr }));
    });
    expect(r.stdout).toMatch(/^plan for public\.big: partition by range:created_at:day/);
    expect(r.stdout.split("\n").filter(Boolean)).toHaveLength(1);
    expect(r.stderr.trim(), r.stderr).toBe("pgshift exit: 0");
  });

  it("bad option values and unknown options: pgshift: error: + hint, exit 2, nothing on stdout", async () => {
    const runs = await Promise.all([
      pgshift(["cutover", "orders", "--lock-timeout", "abc", "--url", db.url]),
      pgshift([...PLAN, "--frobnicate", "--url", db.url]),
      pgshift([...PLAN, "--jsn", "--url", db.url]),
      pgshift(["plan", "orders", "--partition-by", "range:created_at:month", "--mode", "sideways", "--url", db.url]),
      pgshift(["plam", "orders"]),
      pgshift([...PLAN, "--url", "mysql://localhost/db"]),
    ]);
    const [badInt, unknown, suggested, badChoice, unknownCommand, badUrl] = runs;
    expectRefusal(badInt!, '--lock-timeout must be an integer >= 1, got "abc"');
    expectRefusal(unknown!, "unknown option '--frobnicate'");
    expectRefusal(suggested!, "unknown option '--jsn'");
    expect(suggested!.stderr).toContain("pgshift: hint: did you mean --json? (pgshift plan --help lists the options)");
    expectRefusal(badChoice!, "argument 'sideways' is invalid");
    expectRefusal(unknownCommand!, "unknown command 'plam'");
    expectRefusal(badUrl!, "--url must start with postgres://");
    for (const r of runs) expect(r!.stdout, describeRun(r!)).toBe("");
  });

  it("--help and --version exit 0 on stdout", async () => {
    for (const args of [["--help"], ["plan", "--help"], ["--version"]]) {
      const r = await pgshift(args);
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.stdout.length, describeRun(r)).toBeGreaterThan(0);
      expect(r.stderr, describeRun(r)).toBe("");
    }
  });
});
