import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir, userInfo } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  type ConnSettings,
  parseServiceFile,
  parseUrlParams,
  planTls,
  resolveConnSettings,
} from "../../src/driver/conninfo.js";
import { PgshiftError } from "../../src/errors.js";

let dir: string;
/** An environment with nothing of the machine's: HOME is an empty directory. */
let env: NodeJS.ProcessEnv;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "pgshift-conninfo-"));
  mkdirSync(join(dir, "home"));
  env = { HOME: join(dir, "home") };
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A file in the test directory with `text` and `mode`; returns its path. */
function file(name: string, text: string, mode = 0o600): string {
  const p = join(dir, name);
  writeFileSync(p, text);
  chmodSync(p, mode);
  return p;
}

async function rejected(p: Promise<unknown>): Promise<PgshiftError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(PgshiftError);
    return err as PgshiftError;
  }
  throw new Error("expected a PgshiftError, nothing was thrown");
}

describe("parseUrlParams: the URL's parts and libpq's query parameters", () => {
  it("reads user, percent-encoded password, host, port and database", () => {
    expect(parseUrlParams("postgres://al%40ice:p%3Aw%2Fd@db.example.com:6432/sales")).toEqual({
      user: "al@ice",
      password: "p:w/d",
      host: "db.example.com",
      port: "6432",
      dbname: "sales",
    });
  });

  it("an IPv6 address, a Unix socket directory (encoded host or ?host=), an empty URL", () => {
    expect(parseUrlParams("postgresql://[::1]:5433/db")).toMatchObject({ host: "::1", port: "5433" });
    expect(parseUrlParams("postgres://%2Fvar%2Frun%2Fpostgresql/db")).toMatchObject({
      host: "/var/run/postgresql",
      dbname: "db",
    });
    expect(parseUrlParams("postgres:///db?host=/tmp")).toMatchObject({ host: "/tmp", dbname: "db" });
    expect(parseUrlParams("postgres://")).toEqual({});
  });

  it("query parameters win over the URL's own parts and are kept as given", () => {
    expect(
      parseUrlParams(
        "postgres://a@h/db?user=b&sslmode=verify-full&sslrootcert=/r.crt&connect_timeout=3&application_name=x",
      ),
    ).toEqual({
      user: "b",
      host: "h",
      dbname: "db",
      sslmode: "verify-full",
      sslrootcert: "/r.crt",
      connect_timeout: "3",
      application_name: "x",
    });
  });

  it("refuses another scheme and a parameter libpq does not know", () => {
    expect(() => parseUrlParams("mysql://h/db")).toThrow(PgshiftError);
    expect(() => parseUrlParams("postgres://h/db?schema=public")).toThrow(
      'unsupported connection parameter "schema" in the URL',
    );
  });
});

describe("resolveConnSettings: URL, then service, then PG* variables, then defaults", () => {
  it("defaults: the OS user, a database named after it, port 5432, sslmode prefer, 10 s", async () => {
    const s = await resolveConnSettings("postgres://h", env);
    const user = userInfo().username;
    expect(s).toMatchObject({
      host: "h",
      port: 5432,
      user,
      database: user,
      sslmode: "prefer",
      connectTimeout: 10,
      password: undefined,
    });
  });

  it("the PG* variables fill what the URL does not give", async () => {
    const s = await resolveConnSettings("postgres://u@h/db", {
      ...env,
      PGHOST: "other",
      PGUSER: "other",
      PGPORT: "6000",
      PGPASSWORD: "pw",
      PGSSLMODE: "require",
      PGCONNECT_TIMEOUT: "7",
      PGAPPNAME: "app",
    });
    expect(s).toMatchObject({
      host: "h",
      user: "u",
      database: "db",
      port: 6000,
      password: "pw",
      sslmode: "require",
      connectTimeout: 7,
      applicationName: "app",
    });
    const fromEnvOnly = await resolveConnSettings(undefined, {
      ...env,
      PGHOST: "e",
      PGDATABASE: "d",
      PGUSER: "x",
      PGSSLROOTCERT: "/r",
      PGSSLCERT: "/c",
      PGSSLKEY: "/k",
    });
    expect(fromEnvOnly).toMatchObject({
      host: "e",
      database: "d",
      user: "x",
      sslrootcert: "/r",
      sslcert: "/c",
      sslkey: "/k",
    });
  });

  it("a service (PGSERVICE or ?service=) fills what the URL does not give, before the variables", async () => {
    const services = file(
      "services.conf",
      "# comment\n[a]\nhost = " +
        "svc-host\nport=7000\ndbname=svcdb\nsslmode=verify-full\nsslrootcert=/svc.crt\n\n[b]\nhost=b\n",
    );
    const s = await resolveConnSettings("postgres://u@/?sslmode=require", {
      ...env,
      PGSERVICEFILE: services,
      PGSERVICE: "a",
      PGHOST: "env-host",
      PGPORT: "1",
    });
    expect(s).toMatchObject({
      host: "svc-host",
      port: 7000,
      database: "svcdb",
      sslmode: "require",
      sslrootcert: "/svc.crt",
      service: "a",
    });
    const viaUrl = await resolveConnSettings("postgres://u@/?service=b", { ...env, PGSERVICEFILE: services });
    expect(viaUrl.host).toBe("b");
    expect(
      (await rejected(resolveConnSettings("postgres://u@h/?service=c", { ...env, PGSERVICEFILE: services }))).message,
    ).toBe('definition of service "c" not found');
  });

  it("the system service file (PGSYSCONFDIR) when the user's does not define the service", async () => {
    const sysdir = join(dir, "sysconf");
    mkdirSync(sysdir, { recursive: true });
    writeFileSync(join(sysdir, "pg_service.conf"), "[sys]\nhost=sys-host\n");
    const s = await resolveConnSettings(undefined, {
      ...env,
      PGSERVICE: "sys",
      PGSYSCONFDIR: sysdir,
      PGSERVICEFILE: join(dir, "none.conf"),
    });
    expect(s.host).toBe("sys-host");
  });

  it("service file errors name the file and line", () => {
    expect(() => parseServiceFile("[a]\nnot a parameter\n", "f.conf")).toThrow(
      'syntax error in service file "f.conf", line 2',
    );
    expect(() => parseServiceFile("[a]\nservice=b\n", "f.conf")).toThrow("nested service specifications not supported");
    expect(() => parseServiceFile("[a]\nfrobnicate=1\n", "f.conf")).toThrow(
      'unsupported connection parameter "frobnicate"',
    );
  });

  it("connect_timeout: 0 or less waits for ever, 1 becomes 2 (libpq), not an integer is refused", async () => {
    const t = async (v: string) =>
      (await resolveConnSettings(`postgres://h/?connect_timeout=${v}`, env)).connectTimeout;
    expect([await t("0"), await t("-5"), await t("1"), await t("3")]).toEqual([0, 0, 2, 3]);
    expect((await rejected(t("1.5"))).message).toBe(
      'invalid integer value "1.5" for connection option "connect_timeout"',
    );
  });

  it("sslmode: libpq's six values only; sslrootcert=system means verify-full and refuses anything weaker", async () => {
    expect((await rejected(resolveConnSettings("postgres://h/?sslmode=true", env))).message).toBe(
      'invalid sslmode value: "true"',
    );
    expect((await resolveConnSettings("postgres://h/?sslrootcert=system", env)).sslmode).toBe("verify-full");
    expect(
      (await rejected(resolveConnSettings("postgres://h/?sslrootcert=system&sslmode=require", env))).message,
    ).toContain('weak sslmode "require" may not be used with sslrootcert=system');
  });

  it("refuses a port that is not a number and several hosts", async () => {
    expect((await rejected(resolveConnSettings("postgres://h/", { ...env, PGPORT: "54x" }))).message).toBe(
      'invalid port number: "54x"',
    );
    expect((await rejected(resolveConnSettings(undefined, { ...env, PGHOST: "a,b" }))).message).toContain(
      "several hosts are not supported",
    );
  });
});

describe("the password file: libpq's matching and its refusal of files others can read", () => {
  const line = (host: string, pw: string) => `${host}:5432:db:u:${pw}`;

  it("first matching line wins; * matches anything; \\: and \\\\ are escapes", async () => {
    const f = file(
      "pgpass-a",
      `${["# a comment line", line("other", "no"), "h:*:db:u:p\\:w\\\\d", line("h", "later")].join("\n")}\n`,
    );
    const s = await resolveConnSettings("postgres://u@h/db", { ...env, PGPASSFILE: f });
    expect(s.password).toBe("p:w\\d");
    expect(s.passwordFile).toBe(f);
    const other = await resolveConnSettings("postgres://u@h:5433/db", { ...env, PGPASSFILE: f });
    expect(other.password).toBe("p:w\\d");
    const noMatch = await resolveConnSettings("postgres://u@h/otherdb", { ...env, PGPASSFILE: f });
    expect(noMatch.password).toBeUndefined();
  });

  it("a connection through the default socket directory matches localhost", async () => {
    const f = file("pgpass-b", `${line("localhost", "sock")}\n`);
    const s = await resolveConnSettings("postgres://u@/db?host=/var/run/postgresql", { ...env, PGPASSFILE: f });
    expect(s.password).toBe("sock");
  });

  it("a password given in the URL or PGPASSWORD wins; ~/.pgpass is the default file (passfile overrides)", async () => {
    const home = join(dir, "home2");
    mkdirSync(home, { recursive: true });
    writeFileSync(join(home, ".pgpass"), `${line("h", "from-home")}\n`, { mode: 0o600 });
    expect((await resolveConnSettings("postgres://u:given@h/db", { HOME: home })).password).toBe("given");
    expect((await resolveConnSettings("postgres://u@h/db", { HOME: home, PGPASSWORD: "env" })).password).toBe("env");
    expect((await resolveConnSettings("postgres://u@h/db", { HOME: home })).password).toBe("from-home");
    const f = file("pgpass-c", `${line("h", "from-passfile")}\n`);
    expect(
      (await resolveConnSettings(`postgres://u@h/db?passfile=${encodeURIComponent(f)}`, { HOME: home })).password,
    ).toBe("from-passfile");
  });

  it("a file readable by group or others, or not a plain file, is ignored with libpq's warning", async () => {
    const f = file("pgpass-d", `${line("h", "secret")}\n`, 0o640);
    const warnings: string[] = [];
    const s = await resolveConnSettings("postgres://u@h/db", { ...env, PGPASSFILE: f }, (m) => warnings.push(m));
    expect(s.password).toBeUndefined();
    expect(warnings).toEqual([
      `password file "${f}" has group or world access; permissions should be u=rw (0600) or less`,
    ]);
    warnings.length = 0;
    await resolveConnSettings("postgres://u@h/db", { ...env, PGPASSFILE: dir }, (m) => warnings.push(m));
    expect(warnings).toEqual([`password file "${dir}" is not a plain file`]);
  });
});

describe("planTls: libpq's sslmode table", () => {
  const base = (over: Partial<ConnSettings>): ConnSettings => ({
    host: "h",
    port: 5432,
    user: "u",
    password: undefined,
    passwordFile: undefined,
    database: "db",
    sslmode: "prefer",
    sslrootcert: undefined,
    sslcert: undefined,
    sslkey: undefined,
    connectTimeout: 10,
    applicationName: undefined,
    service: undefined,
    ...over,
  });

  it("disable and Unix sockets: no TLS; prefer and allow: unverified", () => {
    expect(planTls(base({ sslmode: "disable" }), env).kind).toBe("off");
    expect(planTls(base({ sslmode: "verify-full", host: "/tmp" }), env).kind).toBe("off");
    expect(planTls(base({ sslmode: "prefer" }), env)).toMatchObject({
      kind: "prefer",
      options: { rejectUnauthorized: false },
    });
    expect(planTls(base({ sslmode: "allow" }), env)).toMatchObject({
      kind: "allow",
      options: { rejectUnauthorized: false },
    });
  });

  it("require: unverified without a root certificate, verified as verify-ca with one", () => {
    expect(planTls(base({ sslmode: "require", sslrootcert: join(dir, "missing.crt") }), env)).toMatchObject({
      kind: "on",
      verify: "none",
      options: { rejectUnauthorized: false },
    });
    const root = file("root.crt", "-----BEGIN CERTIFICATE-----\n");
    expect(planTls(base({ sslmode: "require", sslrootcert: root }), env)).toMatchObject({
      kind: "on",
      verify: "ca",
      options: { rejectUnauthorized: true, host: "h" },
    });
    expect(planTls(base({ sslmode: "verify-full", sslrootcert: root }), env)).toMatchObject({
      kind: "on",
      verify: "full",
      options: { rejectUnauthorized: true, host: "h" },
    });
    expect(planTls(base({ sslmode: "verify-full", sslrootcert: "system" }), env)).toMatchObject({
      kind: "on",
      verify: "full",
    });
  });

  it("verify-ca and verify-full with no root certificate are refused (default ~/.postgresql/root.crt)", () => {
    expect(() => planTls(base({ sslmode: "verify-full" }), env)).toThrow(
      `root certificate file "${join(env.HOME!, ".postgresql", "root.crt")}" does not exist`,
    );
    expect(() => planTls(base({ sslmode: "verify-ca", sslrootcert: join(dir, "missing.crt") }), env)).toThrow(
      "does not exist",
    );
  });

  it("a client certificate needs its key, private to its owner", () => {
    const cert = file("client.crt", "cert");
    expect(() => planTls(base({ sslmode: "require", sslcert: cert, sslkey: join(dir, "missing.key") }), env)).toThrow(
      "certificate present, but not private key file",
    );
    const key = file("client.key", "key", 0o644);
    expect(() => planTls(base({ sslmode: "require", sslcert: cert, sslkey: key }), env)).toThrow(
      "has group or world access",
    );
    chmodSync(key, 0o600);
    expect(planTls(base({ sslmode: "require", sslcert: cert, sslkey: key }), env)).toMatchObject({
      kind: "on",
      options: { cert: "cert", key: "key" },
    });
    // A missing client certificate is no error: none is sent (libpq).
    expect(planTls(base({ sslmode: "require", sslcert: join(dir, "none.crt") }), env)).toMatchObject({
      kind: "on",
      verify: "none",
    });
  });
});
