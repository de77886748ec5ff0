/**
 * The replication adapter: the replication connection (node-postgres, opened by pg-logical-replication) and the
 * stream of a slot's pgoutput messages, with the workarounds for both packages, each naming its entry in
 * UPSTREAM (upstream.ts), where a test checks that the behaviour is still there. Nothing else in pgshift
 * imports pg or pg-logical-replication.
 */
import pTimeout from "p-timeout";
import type { ClientConfig } from "pg";
import type { LogicalReplicationService, Pgoutput } from "pg-logical-replication";
import { resolvedTarget, SESSION_FORMATS } from "./postgres.js";

export type { Pgoutput } from "pg-logical-replication";

type Library = typeof import("pg-logical-replication");
let library: Promise<Library> | null = null;

/**
 * node-postgres and pg-logical-replication, loaded on first use: only logical mode's stream needs them, and
 * loading them took about 0.3 s of every command's start (docs/benchmarks.md, "overhead per run").
 */
function loadLibrary(): Promise<Library> {
  library ??= (async () => {
    const pg = (await import("pg")).default;
    // UPSTREAM.pgLogicalReplicationParsesWithGlobalTypes: pgoutput's values are applied as the text PostgreSQL
    // sent, typed by the server from the target columns; parsing them into JavaScript values (Date, number,
    // object) would lose precision (microseconds, numeric, int8). The library takes each column's parser from
    // node-postgres's process-wide registry: make every parser the identity. Nothing else in pgshift uses pg.
    (pg.types as unknown as { getTypeParser: () => (value: string) => string }).getTypeParser = () => (value: string) =>
      value;
    return import("pg-logical-replication");
  })();
  return library;
}

/** An LSN as PostgreSQL writes it (`16/B374D848`). */
export function lsnText(v: bigint): string {
  return `${(v >> 32n).toString(16).toUpperCase()}/${(v & 0xffffffffn).toString(16).toUpperCase()}`;
}

/**
 * node-postgres client settings that reach the server the way connect() does for `url` (default DATABASE_URL,
 * then the PG* variables): host, port, user, password (password file included), database, TLS (sslmode prefer
 * decided by asking the server; a URL from connectionUrl() keeps its pool's decision) and connect_timeout as
 * connectionTimeoutMillis.
 * @throws PgshiftError as connect() does for invalid settings or a missing root certificate.
 */
export async function replicationConfig(url?: string): Promise<ClientConfig> {
  const { settings: s, tls } = await resolvedTarget(url);
  return {
    host: s.host,
    port: s.port,
    user: s.user,
    ...(s.password !== undefined ? { password: s.password } : {}),
    database: s.database,
    ssl: tls.kind === "on" ? tls.options : false,
    connectionTimeoutMillis: s.connectTimeout * 1000,
  };
}

export interface StreamSource {
  slot: string;
  publication: string;
  /** application_name of the walsender. */
  applicationName: string;
}

export interface StreamHandlers {
  /** Each message in stream order; the next one is handed over once the promise settles (flow control). */
  onMessage: (msg: Pgoutput.Message) => Promise<void>;
  /** A keepalive: the server's WAL position, and whether it asks for an answer now. */
  onKeepalive: (lsn: string, shouldRespond: boolean) => void;
  /** The stream failed (an error of the server, the connection lost). May come more than once. */
  onError: (err: Error) => void;
  /** The server ended the stream (error code CONNECTION_ENDED, see isConnectionLoss). */
  onEnd: (ended: Error) => void;
}

/**
 * A slot's pgoutput stream (protocol version 1, with logical messages), taken one message at a time, read on
 * a replication connection (`config`, see replicationConfig) whose output settings are pgshift's (SESSION_FORMATS).
 * Nothing is confirmed to the slot unless confirm() says so.
 */
export class ReplicationStream {
  /** The library's service, made by start() once the library is loaded (loadLibrary). */
  private service: LogicalReplicationService | null = null;
  private readonly source: StreamSource;
  private readonly config: ClientConfig;
  private readonly handlers: StreamHandlers;
  private running: Promise<void> | null = null;
  private cancelStart: ((err: unknown) => void) | null = null;
  private stopped = false;

  constructor(source: StreamSource, config: ClientConfig, handlers: StreamHandlers) {
    this.source = source;
    this.config = config;
    this.handlers = handlers;
  }

  private makeService(lib: Library): LogicalReplicationService {
    const { source, config, handlers } = this;
    const service = new lib.LogicalReplicationService(
      {
        ...config,
        application_name: source.applicationName,
        // pgoutput writes values with the walsender's output settings: pin them (see SESSION_FORMATS).
        options: Object.entries(SESSION_FORMATS)
          .map(([k, v]) => `-c ${k}=${v.replace(/ /g, "\\ ")}`)
          .join(" "),
      },
      { acknowledge: { auto: false, timeoutSeconds: 0 }, flowControl: { enabled: true } },
    );
    service.on("data", (_lsn: string, msg: Pgoutput.Message) => handlers.onMessage(msg));
    service.on("heartbeat", (lsn: string, _ts: number, shouldRespond: boolean) =>
      handlers.onKeepalive(lsn, shouldRespond),
    );
    service.on("error", (err: Error) => handlers.onError(err));
    return service;
  }

  /**
   * Connects and starts streaming from the slot's confirmed position; resolves once the server streams.
   * @throws the server's error (code 55006 when another process streams from the slot), the connection's, an
   *   error of code CONNECTION_ENDED when the server ended the stream at once, or what abandonStart() was given.
   */
  async start(): Promise<void> {
    let resolveStarted: () => void = () => {};
    const started = new Promise<void>((resolve, reject) => {
      // UPSTREAM.nodePostgresEndWhileConnectingHangs: once the client is ended while it connects, subscribe()
      // may never settle: abandonStart() ends the wait (also while the library loads).
      this.cancelStart = reject;
      resolveStarted = resolve;
    });
    let lib: Library;
    try {
      lib = await Promise.race([loadLibrary(), started.then(() => loadLibrary())]);
    } catch (err) {
      this.cancelStart = null;
      throw err;
    }
    const service = this.makeService(lib);
    this.service = service;
    service.once("start", () => resolveStarted());
    service.once("error", (err: Error) => this.cancelStart?.(err));
    const plugin = new lib.PgoutputPlugin({
      protoVersion: 1,
      publicationNames: [this.source.publication],
      messages: true,
    });
    // UPSTREAM.pgLogicalReplicationRefusedStartEmitsNoError: a refused START_REPLICATION only rejects
    // subscribe(), so the wait for "start" ends on subscribe() too.
    this.running = service.subscribe(plugin, this.source.slot).then(
      () => {
        // The server ended the stream (it shuts down, or the walsender was told to stop): nothing arrives
        // from here on. CONNECTION_ENDED: see isConnectionLoss.
        const ended = Object.assign(new Error("the server ended the replication stream"), { code: "CONNECTION_ENDED" });
        if (!this.stopped) this.handlers.onEnd(ended);
        this.cancelStart?.(ended);
      },
      (err: unknown) => {
        const e = err instanceof Error ? err : new Error(String(err));
        this.handlers.onError(e);
        this.cancelStart?.(e);
      },
    );
    try {
      await started;
    } finally {
      this.cancelStart = null;
    }
  }

  /** Ends start()'s wait with `err`, if it still waits. */
  abandonStart(err: unknown): void {
    this.cancelStart?.(err);
  }

  /**
   * Reports `pos` as written, flushed and applied, asking for a keepalive at once when `ping`. `pos` is where
   * the next record starts (a commit record's end, a keepalive's position). The library reports one byte past
   * what it is given (UPSTREAM.pgLogicalReplicationAcknowledgeAddsOne), so it is given pos - 1: reporting
   * pos + 1 would tell the server that a transaction whose commit record starts exactly at pos was done, and
   * it would not be sent again after a restart. Never throws.
   */
  async confirm(pos: bigint, ping = false): Promise<void> {
    if (this.stopped || !this.service) return;
    await this.service.acknowledge(lsnText(pos > 0n ? pos - 1n : 0n), ping).catch(() => {});
  }

  /**
   * Messages received and not handed to onMessage yet, and whether one is being handled: the library's private
   * flow-control queue (UPSTREAM.pgLogicalReplicationQueueIsPrivate).
   */
  pending(): { length: number; processing: boolean } {
    const s = (this.service ?? {}) as unknown as { _messageQueue?: unknown[]; _processing?: boolean };
    return { length: s._messageQueue?.length ?? 0, processing: Boolean(s._processing) };
  }

  /**
   * Detaches from the slot and closes the connection, within about 7 s whatever the library does: node-postgres's
   * end() never settles when the client was ended while it connected (UPSTREAM.nodePostgresEndWhileConnectingHangs),
   * and then neither does subscribe(). Never throws.
   */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.service) await pTimeout(this.service.stop(), { milliseconds: 5000, message: false }).catch(() => {});
    const running = this.running;
    this.running = null;
    if (running) await pTimeout(running, { milliseconds: 2000, message: false }).catch(() => {});
  }
}
