import { existsSync } from "node:fs";
import type { TestProject } from "vitest/node";
import { embeddedMajor, startEmbedded } from "../../src/embedded.js";
import { PgshiftError } from "../../src/errors.js";

declare module "vitest" {
  export interface ProvidedContext {
    pgUrl: string;
    pgProvider: string;
  }
}

function dockerEngine(): boolean {
  if (process.env.PGSHIFT_TEST_NO_DOCKER) return false;
  return Boolean(process.env.DOCKER_HOST) || existsSync("/var/run/docker.sock");
}

/**
 * The PostgreSQL every test file gets a database on, started once per run:
 * DATABASE_URL when set; else a Testcontainers PostgreSQL (image postgres:<major>, wal_level=logical) when a
 * Docker engine is reachable; else the embedded server (src/embedded.ts). The major is PGSHIFT_TEST_PG (14-18),
 * default DEFAULT_EMBEDDED_MAJOR; tests that start servers of their own (startEmbedded) read the same variable.
 * A server that cannot be started fails the run with one line (cause and hint), not a stack trace.
 */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  if (process.env.DATABASE_URL) {
    project.provide("pgUrl", process.env.DATABASE_URL);
    project.provide("pgProvider", "DATABASE_URL");
    return async () => {};
  }
  let major: number;
  try {
    major = embeddedMajor();
  } catch (err) {
    throw oneLineError(err);
  }
  if (dockerEngine()) {
    try {
      const { PostgreSqlContainer } = await import("@testcontainers/postgresql");
      const c = await new PostgreSqlContainer(`postgres:${major}`)
        .withCommand(["postgres", "-c", "wal_level=logical", "-c", "max_connections=200", "-c", "fsync=off"])
        .start();
      project.provide("pgUrl", c.getConnectionUri());
      project.provide("pgProvider", `testcontainers postgres:${major}`);
      return async () => {
        await c.stop();
      };
    } catch (err) {
      console.warn(
        `Docker engine not usable (${err instanceof Error ? err.message : String(err)}); using the embedded server`,
      );
    }
  }
  try {
    const srv = await startEmbedded({ major });
    project.provide("pgUrl", srv.url);
    project.provide("pgProvider", `embedded PostgreSQL ${srv.version}`);
    return srv.stop;
  } catch (err) {
    throw oneLineError(err);
  }
}

/** The start failure as one line (message and hint), without the stack vitest would print. */
function oneLineError(err: unknown): Error {
  const e = new Error(
    err instanceof PgshiftError && err.hint
      ? `${err.message} (hint: ${err.hint})`
      : err instanceof Error
        ? err.message
        : String(err),
  );
  e.stack = `Error: ${e.message}`;
  return e;
}
