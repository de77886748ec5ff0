/**
 * The behaviours of pgshift's drivers that pgshift works around, one entry each: the package (at the exact
 * version package.json pins), what it does, and where pgshift works around it. Every workaround in
 * src/driver/ names its entry. test/integration/drivers.test.ts has one test per entry, named by its key, that
 * passes while the package still behaves so: when an upgrade makes one fail, its workaround may go (and the
 * entry with it).
 */
export interface UpstreamBehaviour {
  /** The npm package. */
  package: "postgres" | "pg" | "pg-logical-replication" | "pg-connection-string" | "pgpass";
  /** What the package does, in one or two sentences. */
  behaviour: string;
  /** What pgshift does about it, and where. */
  workaround: string;
}

export const UPSTREAM = {
  postgresJsSplitsHostOnColon: {
    package: "postgres",
    behaviour: "a host given as a string is split on ':' (host:port lists), so an IPv6 address is cut",
    workaround: "driver/postgres.ts openPool passes host and port as one-element arrays",
  },
  postgresJsTlsObjectNeverFallsBack: {
    package: "postgres",
    behaviour:
      "ssl is either 'prefer' (no TLS options, so no client certificate) or TLS options that require TLS: " +
      "a server without TLS is refused, there is no 'prefer' with a certificate",
    workaround: "driver/postgres.ts connect asks the server itself (SSLRequest) before it picks TLS or not",
  },
  postgresJsReconnectsForEverOnCleanClose: {
    package: "postgres",
    behaviour:
      "a socket that closes cleanly while a connection starts leaves the query waiting for ever and connects " +
      "again at once, without end, whatever connect_timeout says (porsager/postgres#1193); a pool that met it " +
      "never answers again",
    workaround:
      "driver/postgres.ts openPool bounds the first query by connect_timeout; failOnConnectionLoss (used by " +
      "cli/common.ts withTable) fails a command at its pool's first lost connection; sync opens new pools for " +
      "each session",
  },
  postgresJsSplitsIdentifiersOnDots: {
    package: "postgres",
    behaviour: 'sql("a.b") is written "a"."b": a name that contains a dot becomes two',
    workaround: "driver/postgres.ts ident quotes such a name itself",
  },
  postgresJsWritesOnClosedReservedConnection: {
    package: "postgres",
    behaviour:
      "a statement sent on (or a release() of) a reserved connection whose socket closed is written to a null " +
      "socket from a timer: an uncaught TypeError ends the process; sql.begin sends its ROLLBACK so too",
    workaround:
      "driver/postgres.ts closedSince tells the holder of a reserved connection that it closed; transaction " +
      "(instead of sql.begin) sends nothing on, and does not release, a lost connection",
  },
  nodePostgresEndWhileConnectingHangs: {
    package: "pg",
    behaviour: "Client.end() called while connect() waits for the server's answer settles neither end() nor connect()",
    workaround: "driver/replication.ts ReplicationStream ends its start() wait itself and bounds stop()",
  },
  nodePostgresTerminationHasNoCode: {
    package: "pg",
    behaviour: 'a connection the server ended fails with "Connection terminated unexpectedly" and no error code',
    workaround: "errors.ts isConnectionLoss recognises the message (nodePostgresTerminated, below)",
  },
  pgLogicalReplicationAcknowledgeAddsOne: {
    package: "pg-logical-replication",
    behaviour: "acknowledge(lsn) reports lsn + 1 as written, flushed and applied (it expects the last byte received)",
    workaround: "driver/replication.ts ReplicationStream.confirm gives it the position - 1",
  },
  pgLogicalReplicationQueueIsPrivate: {
    package: "pg-logical-replication",
    behaviour:
      "with flow control, messages received and not yet handed to the 'data' listener wait in the private " +
      "_messageQueue (_processing while one is handled); no public API says how many wait",
    workaround: "driver/replication.ts ReplicationStream.pending reads them, and only there",
  },
  pgLogicalReplicationRefusedStartEmitsNoError: {
    package: "pg-logical-replication",
    behaviour:
      "when the server refuses START_REPLICATION (slot missing or in use) subscribe() rejects but no 'error' " +
      "event is emitted",
    workaround: "driver/replication.ts ReplicationStream.start waits on subscribe() as well as on the events",
  },
  pgLogicalReplicationParsesWithGlobalTypes: {
    package: "pg-logical-replication",
    behaviour:
      "pgoutput values are parsed by node-postgres's process-wide type parsers (pg.types.getTypeParser): " +
      "timestamps become Dates (microseconds lost), json becomes objects",
    workaround: "driver/replication.ts makes every node-postgres parser the identity (nothing else uses pg)",
  },
  pgConnectionStringReadsCertificateFiles: {
    package: "pg-connection-string",
    behaviour: "parse() reads the files that sslcert, sslkey and sslrootcert name (and throws when one is missing)",
    workaround: "driver/conninfo.ts parseUrlParams gives it the URL without its query string",
  },
  pgpassLaterLineWins: {
    package: "pgpass",
    behaviour: "its reader returns the last matching line of the password file, where libpq takes the first",
    workaround: "driver/conninfo.ts passwordFromFile matches the lines itself with pgpass's helper functions",
  },
} as const satisfies Record<string, UpstreamBehaviour>;

export type UpstreamName = keyof typeof UPSTREAM;

/**
 * Whether `err` is node-postgres's error for a connection the server ended (UPSTREAM.nodePostgresTerminationHasNoCode):
 * "Connection terminated" or "Connection terminated unexpectedly", which carries no code.
 */
export function nodePostgresTerminated(err: unknown): boolean {
  return err instanceof Error && /connection terminated/i.test(err.message);
}
