import pTimeout from "p-timeout";
import { z } from "zod";
import { closedSince, connect, replicationConfig, type Sql, type TxSql } from "../db.js";
import { lsnText, type Pgoutput, ReplicationStream } from "../driver/replication.js";
import { isConnectionLoss, PgshiftError } from "../errors.js";
import { log } from "../log.js";
import { STREAMING_PHASES } from "../migration/phases.js";
import type { Phase, StreamingMigration } from "../migration/state.js";
import { quoteIdent, quoteQualified } from "../names.js";
import { Bindings, columnList, placeholders } from "../sql/statement.js";
import { ChangeBatch, columnTypes, type Tuple } from "./changes.js";
import { lsnToBigInt, slotState } from "./logical.js";

// Tuples are applied as the text PostgreSQL sent, and typed by the server from the target columns (the
// replication adapter hands values over as text, see driver/replication.ts).

/** A batch is written before it holds more row changes than this, or more characters of values. */
const BATCH_CHANGES = 2000;
const BATCH_CHARS = 8 << 20;
const CopiesRow = z.object({ copies_lsn: z.string().nullable() });

/** A group of source transactions commits at a source commit once it is this old (ms) or holds this many. */
const GROUP_MS = 50;
/**
 * The logical message (pg_logical_emit_message) a command waiting for a stream position writes: it makes
 * the server flush its WAL (stream.ts, flushWal), and tells whichever applier reads it to commit its group
 * at once. pgoutput sends messages only when asked (its `messages` option, PostgreSQL 14+).
 */
export const FLUSH_MESSAGE = { prefix: "pgshift", content: "flush" } as const;
const GROUP_TRANSACTIONS = 5000;

/**
 * Sent prepared (postgres.js `prepare`: parsed once per connection, then only bound and run): the applier
 * sends the same statements for every group and every partial update.
 */
const PREPARED = { prepare: true } as const;

/**
 * The fenced record of a group's end (see commitGroup): $1 the end LSN, $2 the last source commit's time, $3 the
 * migration's id, $4 its replication slot, $5 the applied position this applier last knew, then the phases that
 * stream (STREAMING_PHASES).
 */
const RECORD_APPLIED_SQL =
  `update pgshift.migrations set applied_lsn = $1, applied_commit_time = $2 ` +
  `where id = $3 and slot_name = $4 and phase::text in (${placeholders(6, STREAMING_PHASES.length)}) ` +
  `and applied_lsn::pg_lsn is not distinct from $5::pg_lsn returning id`;

/** `(<names>) <op> ($i, ...)`: the values of `names` in `t` bound to `b` (an unsent value as null). */
function match(b: Bindings, names: readonly string[], t: Tuple, op = "="): string {
  return `(${columnList(names)}) ${op} (${b.list(names.map((c) => t[c] ?? null))})`;
}

/** The phases in which the shadow follows the slot: from cutover on, nothing may be applied any more. */
export { STREAMING_PHASES };

/**
 * A group was refused at its commit (and rolled back) because the applier is no longer the one entitled to
 * write the shadow: the migration left the streaming phases (cut over, aborted, swapped back) or uses another
 * slot, or another applier committed since this one read the applied position (two appliers overlapped: one
 * that was stopped while its group was still running, and its successor). Nothing of the group stays.
 * Starting again from the slot's confirmed position is safe (sync and the followers do so while the
 * migration still streams).
 */
export class StreamFenced extends PgshiftError {
  constructor(message: string) {
    super(message, {
      hint:
        "nothing of the refused group was kept; pgshift sync (or the command that follows the stream) starts " +
        "again from the slot's confirmed position while the migration still streams",
    });
    this.name = "StreamFenced";
  }
}

export interface ApplierProgress {
  /** End LSN of the last transaction applied (or of the last keepalive when idle and caught up). */
  appliedLsn: string;
  /** Transactions and row changes applied by this applier. */
  transactions: number;
  changes: number;
  lastCommitTime: Date | null;
}

export interface ApplierOptions {
  url?: string | undefined;
  onCommit?: (p: ApplierProgress) => void;
}

/**
 * Applies the replication slot's stream of the source table to the shadow, on its own connection.
 *
 * - Each decoded transaction is applied whole, in commit order, inside one transaction of the shadow that
 *   may hold several consecutive ones (a group). Messages are taken one at a time (flow control); memory is
 *   bounded by the batch limits below, whatever the size of a transaction.
 * - Row changes are written as sets (ChangeBatch, src/mirror/changes.ts): the net effect per primary key of
 *   the group's changes, a DELETE and multi-row upserts (three statements at most) per batch of up to 2,000
 *   changes (or 8 M characters of values). INSERT upserts; UPDATE replaces the row found by its old primary key (a row
 *   whose key or partition column changed leaves its old place); DELETE removes by primary key. An UPDATE whose
 *   unchanged TOASTed values were not sent by pgoutput is applied on its own after the batch is written: until
 *   the copy is over and the stream past its end, the row is taken whole from the source (its current version
 *   is at least as new, and later changes replay on top; the shadow may hold a batch's older copy under its
 *   key); after that only the sent columns are written, the old values carried over when the row moves, and a
 *   row not in the shadow is read from the source (applyPartialUpdate).
 * - The migration row records the applied LSN in the same transaction; the slot's confirmed LSN is advanced
 *   only after COMMIT, so a crash at any point loses nothing: the slot re-sends what was not confirmed and
 *   transactions at or below the recorded LSN are skipped. That record is fenced (commitGroup): a group
 *   commits only while the migration is in a streaming phase with this slot and the row still holds the
 *   position this applier last recorded, so nothing is applied after a cutover (whatever a table is called
 *   by then) and no applier overwrites what another one committed after it started.
 * - Keepalives are answered; when idle and caught up, the keepalive's position is confirmed, so that the
 *   slot does not retain WAL written by other tables.
 */
export class Applier {
  private readonly m: StreamingMigration;
  private readonly opts: ApplierOptions;
  private stream: ReplicationStream | null = null;
  private sql: Sql | null = null;
  private tx: TxSql | null = null;
  /** Whether the connection of `tx` has closed since it was reserved (see closedSince). */
  private txClosed: () => boolean = () => false;
  private batch: ChangeBatch | null = null;
  private skipping = false;
  private failed: Error | null = null;
  private pingTimer: NodeJS.Timeout | null = null;
  private applied: bigint;
  /**
   * applied_lsn as the migration row holds it, as far as this applier knows (its start, then each group it
   * committed). A group commits only if the row still says so (see commitGroup): otherwise another applier
   * wrote the shadow meanwhile, or the migration moved on.
   */
  private rowApplied: string | null;
  private commitTime: Date | null = null;
  private begun: { commitLsn: bigint; commitTime: Date } | null = null;
  private group: {
    started: number;
    txns: number;
    end: bigint;
    commitTime: Date | null;
    exact: boolean;
    flush: boolean;
    /** Whether the copy is over and the stream past its end (see groupModes): partial updates merge in place. */
    settled: boolean;
  } | null = null;
  /** Once true it stays so (copies_lsn is set once, the applied position only grows): groupModes asks no more. */
  private settledSeen = false;
  /** The message (or the timed group commit) being handled: they run one after the other. */
  private inFlight: Promise<void> = Promise.resolve();
  private commitTimer: NodeJS.Timeout | null = null;
  /** Callers of waitFor(): while there are any, a group commits as soon as the stream pauses. */
  private waiters = 0;
  private stopping = false;
  transactions = 0;
  changes = 0;
  /** Groups applied in exact mode (see groupModes). */
  exactGroups = 0;

  constructor(m: StreamingMigration, opts: ApplierOptions = {}) {
    // The type says so; a caller from JavaScript may not have checked (isStreaming, state.ts).
    if (m.mode !== "logical" || !m.slot_name || !m.publication_name)
      throw new PgshiftError("this migration has no replication slot (trigger mode?)");
    this.m = m;
    this.opts = opts;
    this.applied = m.applied_lsn ? lsnToBigInt(m.applied_lsn) : 0n;
    this.rowApplied = m.applied_lsn;
  }

  get progress(): ApplierProgress {
    return {
      appliedLsn: lsnText(this.applied),
      transactions: this.transactions,
      changes: this.changes,
      lastCommitTime: this.commitTime,
    };
  }

  /** The error that stopped the stream, if any. */
  get error(): Error | null {
    return this.failed;
  }

  /**
   * Attaches to the slot and starts applying. Resolves once streaming has started.
   * @throws PgshiftError (code 55006 in `cause`) when another consumer holds the slot; the connection-loss
   *   error (see isConnectionLoss) when the apply session's connection closed while starting.
   */
  async start(): Promise<void> {
    this.sql = await connect({
      url: this.opts.url,
      applicationName: `pgshift apply ${this.m.source_table}`,
      rawText: true,
      onClose: () => this.connectionLost(),
    });
    try {
      const slot = await slotState(this.sql, this.m.slot_name);
      if (slot.invalidated !== null) {
        throw new PgshiftError(
          `replication slot ${this.m.slot_name} was invalidated by PostgreSQL (${slot.invalidated}): the WAL it ` +
            `needed is gone, the shadow can no longer follow the table`,
          {
            hint:
              "run pgshift abort and start again (max_slot_wal_keep_size limits the WAL a slot may hold back; " +
              "keep pgshift sync running)",
          },
        );
      }
      this.batch = new ChangeBatch({
        table: this.m.partitioned,
        columns: this.m.copy_columns,
        types: await columnTypes(this.sql, this.m.partitioned),
        pk: this.m.key_columns,
        key: this.m.shadow_key,
      });
    } catch (err) {
      await this.stop();
      throw this.lostDuringStart() ?? err;
    }
    // The same server, credentials, TLS and connect timeout as the apply session (libpq's settings, see connect).
    const stream = new ReplicationStream(
      {
        slot: this.m.slot_name,
        publication: this.m.publication_name,
        applicationName: this.m.slot_name,
      },
      await replicationConfig(this.opts.url),
      {
        onMessage: (msg) => this.serially(() => this.onMessage(msg)),
        onKeepalive: (lsn, shouldRespond) => this.onKeepalive(lsn, shouldRespond),
        onError: (err) => {
          this.failed ??= err;
        },
        onEnd: (ended) => {
          if (!this.stopping) this.failed ??= ended;
        },
      },
    );
    this.stream = stream;
    try {
      await stream.start();
    } catch (err) {
      await this.stop();
      // The apply session lost in the meantime stopped the stream itself: the replication client's
      // "Client was closed" is a consequence; the loss is the cause, and worth connecting again for.
      const lost = this.lostDuringStart();
      if (lost) throw lost;
      const code = (err as { code?: string }).code;
      throw new PgshiftError(
        code === "55006"
          ? `replication slot ${this.m.slot_name} is in use by another process`
          : `cannot stream from replication ` +
              `slot ${this.m.slot_name}: ${err instanceof Error ? err.message : String(err)}`,
        {
          cause: err,
          hint:
            code === "55006"
              ? "a pgshift sync process is probably attached; stop it or let this command wait for it"
              : undefined,
        },
      );
    }
    // Ask for a keepalive now and then: its position lets an idle applier confirm progress.
    this.pingTimer = setInterval(() => void this.ping(), 250);
  }

  /** Reports `pos` (where the next record starts) as written, flushed and applied (ReplicationStream.confirm). */
  private async confirm(pos: bigint, ping = false): Promise<void> {
    // After a failure the open group is being rolled back: confirming any position now could tell the
    // slot that transactions of that group were applied, and they would never be sent again.
    if (!this.stream || this.failed || this.stopping) return;
    await this.stream.confirm(pos, ping);
  }

  private async ping(): Promise<void> {
    if (!this.stream || this.failed) return;
    await this.confirm(this.applied, true);
  }

  /** Messages received and not handed to onMessage yet (ReplicationStream.pending). */
  private queued(): { length: number; processing: boolean } {
    return this.stream?.pending() ?? { length: 0, processing: false };
  }

  private queueEmpty(): boolean {
    const q = this.queued();
    return q.length === 0 && !q.processing;
  }

  private onKeepalive(lsn: string, shouldRespond: boolean): void {
    if (this.failed || this.stopping) return;
    const pos = lsnToBigInt(lsn);
    if (!this.tx && !this.skipping && this.queueEmpty() && pos > this.applied) {
      // Everything the server had sent before this keepalive is applied: confirm its position.
      this.applied = pos;
      void this.confirm(pos);
    } else if (shouldRespond) {
      void this.confirm(this.applied);
    }
  }

  /** Runs `fn` after whatever is being handled (a message, a timed group commit). */
  private serially(fn: () => Promise<void>): Promise<void> {
    const p = this.inFlight.then(fn);
    this.inFlight = p.catch(() => {});
    return p;
  }

  private async onMessage(msg: Pgoutput.Message): Promise<void> {
    if (this.failed || this.stopping) return;
    try {
      switch (msg.tag) {
        case "begin": {
          const commitLsn = msg.commitLsn ? lsnToBigInt(msg.commitLsn) : 0n;
          this.begun = { commitLsn, commitTime: new Date(Number(BigInt(msg.commitTime as bigint) / 1000n)) };
          // Already applied before a crash (the slot re-sends what was not confirmed): skip it. `commitLsn` is
          // where the transaction's commit record starts and `applied` where the last applied one ended; two
          // commit records can be adjacent, so equal means "not applied yet".
          this.skipping = commitLsn !== 0n && commitLsn < this.applied;
          if (!this.skipping && !this.tx) {
            // Consecutive source transactions are applied in one transaction of the shadow (a group), still
            // whole and in commit order. A group commits at a source commit once it is 50 ms old (short, so the
            // backfill's batches seldom wait for its row locks) or holds 5,000 transactions; when the stream
            // pauses before that, 50 ms after it began (at once while someone waits for a position).
            this.txClosed = closedSince(this.sql!);
            this.tx = await this.sql!.reserve();
            await this.live().unsafe("begin");
            const modes = await this.groupModes(this.live());
            this.group = {
              started: Date.now(),
              txns: 0,
              end: this.applied,
              commitTime: null,
              exact: modes.exact,
              flush: false,
              settled: modes.settled,
            };
            if (this.group.exact) this.exactGroups++;
          }
          return;
        }
        case "insert":
        case "update":
        case "delete":
          if (this.skipping || !this.tx) return;
          if (msg.relation.schema !== this.m.original.schema) return;
          // The stream names the table as it is called when the change was made: another name means the
          // migration was cut over (the DDL guard refuses other renames) and this is a write the reverse
          // mirror made in the retired table. Never apply it; the group's commit would be fenced anyway.
          if (msg.relation.name !== this.m.original.name) {
            throw new StreamFenced(
              `a change of ${msg.relation.schema}.${msg.relation.name} reached the stream: ${this.m.original.name} ` +
                `was renamed (cut over), the stream applies nothing more (the group in hand was rolled back)`,
            );
          }
          this.changes++;
          await this.applyChange(this.live(), msg);
          return;
        case "relation": {
          // Sent before the first change of the table and again after an ALTER TABLE: the columns the stream
          // carries from here on. The shadow has the columns of the start; a change would be applied without
          // the new column, or with NULL for a dropped one. Stop before applying anything of it.
          const streamed = msg.columns.map((c) => c.name);
          const added = streamed.filter((c) => !this.m.copy_columns.includes(c));
          const dropped = this.m.copy_columns.filter((c) => !streamed.includes(c));
          if (added.length > 0 || dropped.length > 0) {
            const what = [
              added.length > 0 ? `added ${added.join(", ")}` : "",
              dropped.length > 0 ? `dropped ${dropped.join(", ")}` : "",
            ]
              .filter(Boolean)
              .join(", ");
            throw new PgshiftError(
              `the columns of ${msg.schema}.${msg.name} changed during the migration (${what}); the shadow cannot ` +
                `follow`,
              {
                hint: "pgshift does not carry ALTER TABLE over: run pgshift abort, and start the migration again",
              },
            );
          }
          return;
        }
        case "message":
          // A command waits for the stream to reach this position (flushWal, e.g. cutover under its lock):
          // commit the group at this transaction's commit rather than when it is GROUP_MS old, so that a
          // `pgshift sync` in another process confirms it at once, as an applier in the waiting process does.
          if (msg.transactional && msg.prefix === FLUSH_MESSAGE.prefix && this.group && !this.skipping)
            this.group.flush = true;
          return;
        case "truncate":
          if (this.skipping) return;
          throw new PgshiftError(`TRUNCATE of ${this.m.source_table} reached the stream; the shadow cannot follow`, {
            hint: "abort the migration (pgshift abort) and start again",
          });
        case "commit": {
          const end = msg.commitEndLsn ? lsnToBigInt(msg.commitEndLsn) : this.applied;
          if (this.skipping || !this.tx) {
            this.skipping = false;
            this.begun = null;
            return;
          }
          const g = this.group!;
          g.end = end;
          g.txns++;
          g.commitTime = this.begun?.commitTime ?? new Date();
          this.begun = null;
          const age = Date.now() - g.started;
          if (
            age >= GROUP_MS ||
            g.txns >= GROUP_TRANSACTIONS ||
            g.flush ||
            (this.waiters > 0 && this.queued().length === 0)
          )
            await this.commitGroup();
          else if (!this.commitTimer) {
            this.commitTimer = setTimeout(() => {
              this.commitTimer = null;
              void this.serially(() => this.commitIdleGroup());
            }, GROUP_MS - age);
          }
          return;
        }
        default:
          return;
      }
    } catch (err) {
      await this.fail(err);
    }
  }

  /**
   * How the group opened in `tx` writes:
   * - `settled`: the backfill's copy is complete (copies_lsn, read after its last batch and its last cleanup
   *   committed, is set) and the stream has applied everything up to it. Until then the shadow may hold rows a
   *   batch copied that the stream's own writes did not see (a batch's uncommitted copy, a ghost not cleaned
   *   yet, src/backfill/cleanup.ts), so an UPDATE whose unchanged TOASTed values were not sent takes the whole
   *   row from the source (applyPartialUpdate) instead of merging into what the shadow holds.
   * - `exact` (settled, and the shadow's key widened with the partition column): the shadow equals the table as
   *   of the applied position, one version of each row (ChangeBatch.write). Rows copied by the backfill (ON
   *   CONFLICT DO NOTHING, possibly newer than the stream) can leave a second version under another partition
   *   until the stream passes the change that moved the row; once everything up to copies_lsn (the copy's end)
   *   is applied that is over, and every later write keeps it so: the applier's own, and verify's repair (which
   *   copies rows only once the stream has caught up with the locked table).
   */
  private async groupModes(tx: TxSql): Promise<{ exact: boolean; settled: boolean }> {
    const widened = this.m.key_columns.length !== this.m.shadow_key.length;
    if (!this.settledSeen) {
      const rows = await tx`select copies_lsn from pgshift.migrations where id = ${this.m.id}`;
      const lsn = CopiesRow.parse(rows[0] ?? { copies_lsn: null }).copies_lsn;
      this.settledSeen = lsn !== null && lsnToBigInt(lsn) <= this.applied;
    }
    return { exact: this.settledSeen && widened, settled: this.settledSeen };
  }

  /** The connection loss that failed this applier while it was starting, if that is what happened. */
  private lostDuringStart(): Error | null {
    return this.failed && isConnectionLoss(this.failed) ? this.failed : null;
  }

  /**
   * The apply connection closed (terminated, server restart, network). Whatever the handler in hand awaits
   * on it may never settle (see ConnectOptions.onClose): fail now, without a statement on it. The server
   * rolled the open group back; nothing of it was confirmed. A new Applier (sync starts one) goes on.
   */
  private connectionLost(): void {
    if (this.stopping || this.failed) return;
    void this.fail(Object.assign(new Error("the apply session's connection was lost"), { code: "CONNECTION_CLOSED" }));
  }

  /** Stops the stream after an error; the open group is rolled back (none of it was confirmed). */
  private async fail(err: unknown): Promise<void> {
    this.failed ??= err instanceof Error ? err : new Error(String(err));
    this.stream?.abandonStart(this.failed);
    if (this.failed instanceof StreamFenced)
      log().warn({ err: this.failed.message }, "apply stopped: the group in hand was rolled back");
    else if (this.stopping)
      log().debug(
        { err: this.failed.message },
        "apply stopped with a group in hand: rolled back, nothing of it confirmed",
      );
    else
      log().error(
        { err: this.failed.message },
        "apply failed; stopping the stream (nothing after the last applied transaction was confirmed)",
      );
    await this.abandonGroup(isConnectionLoss(err));
    void this.stop();
  }

  /** The timed commit: commits the open group if the stream is between two source transactions. */
  private async commitIdleGroup(): Promise<void> {
    if (this.failed || this.stopping || !this.tx || this.begun) return;
    try {
      await this.commitGroup();
    } catch (err) {
      await this.fail(err);
    }
  }

  /**
   * Commits the open group, records its end LSN in the migration row, then confirms it to the slot.
   *
   * The record is fenced: the row is updated only while the migration still streams through this slot
   * (phase started, backfilling or backfilled) and still holds the applied position this applier last
   * knew; otherwise the group is rolled back (StreamFenced). The cutover changes the phase in its own
   * transaction on the same row, so a group either commits before the cutover's renames or not at all,
   * whichever table its statements reached; and of two appliers that overlap (one stopped while its group
   * still ran, and the next one, started from the row as it was), only the first to commit keeps its group:
   * the other's older versions can never overwrite newer ones.
   * @throws StreamFenced as above; the group's error when it was abandoned meanwhile (stop, lost connection):
   *   no statement of an abandoned group is sent, so nothing is recorded without the changes it stands for.
   */
  private async commitGroup(): Promise<void> {
    if (this.commitTimer) clearTimeout(this.commitTimer);
    this.commitTimer = null;
    const g = this.group;
    if (!this.tx || !g) return;
    const tx = this.live();
    await this.batch!.write(tx, g.exact);
    this.requireCurrent(tx, g);
    const end = lsnText(g.end);
    const recorded = await tx.unsafe(
      RECORD_APPLIED_SQL,
      [
        end,
        (g.commitTime ?? new Date()).toISOString(),
        this.m.id,
        this.m.slot_name,
        this.rowApplied,
        ...STREAMING_PHASES,
      ],
      PREPARED,
    );
    if (recorded.count === 0) throw new StreamFenced(await this.fenceReason(tx));
    this.requireCurrent(tx, g);
    await tx.unsafe("commit");
    this.rowApplied = end;
    this.applied = g.end;
    this.commitTime = g.commitTime;
    this.transactions += g.txns;
    // Abandoned while COMMIT was on its way (stop): committed all the same, and abandonGroup owns the connection.
    if (this.tx !== tx) return;
    if (!this.txClosed()) tx.release();
    this.tx = null;
    this.group = null;
    await this.confirm(g.end);
    this.opts.onCommit?.(this.progress);
  }

  /**
   * @throws when the group `g` open on `tx` was abandoned (stop, a lost connection) while a statement of it
   *   ran: the server rolls it back (abandonGroup sent ROLLBACK, or the connection is gone), and sending its
   *   next statement would run it outside the group (the applied position recorded without the changes).
   */
  private requireCurrent(tx: TxSql, g: NonNullable<Applier["group"]>): void {
    if (this.tx !== tx || this.group !== g)
      throw this.failed ?? new Error("the apply group was abandoned (the applier is stopping)");
  }

  /** Why the fenced update of commitGroup found no row, read in the group's transaction. */
  private async fenceReason(tx: TxSql): Promise<string> {
    const rows =
      await tx`select phase::text as phase, slot_name, applied_lsn from pgshift.migrations where id = ${this.m.id}`;
    const r = rows[0] as { phase: string; slot_name: string | null; applied_lsn: string | null } | undefined;
    if (!r)
      return `the migration of ${this.m.source_table} is gone (aborted or finalized): the stream applies nothing more`;
    if (!STREAMING_PHASES.includes(r.phase as Phase) || r.slot_name !== this.m.slot_name) {
      return (
        `the migration of ${this.m.source_table} is in ` +
        `phase ${r.phase}${r.slot_name === this.m.slot_name ? "" : " without this replication slot"}: the stream ` +
        `applies nothing more (the group in hand was rolled back)`
      );
    }
    return (
      `another applier recorded ${r.applied_lsn ?? "-"} in the migration row since this one ` +
      `read ${this.rowApplied ?? "-"}: this one's group was rolled back (it starts again from the slot's confirmed ` +
      `position)`
    );
  }

  /**
   * Rolls back the open group: none of it was confirmed, so the slot sends it again on the next start.
   * `lost`: its connection is gone (the server rolled it back), send nothing on it.
   */
  private async abandonGroup(lost = false): Promise<void> {
    const tx = this.tx;
    this.tx = null;
    this.group = null;
    this.begun = null;
    this.batch?.clear();
    // On a lost connection the server has rolled back already; a statement (or a release into the pool)
    // on it would crash the process (see closedSince).
    if (tx && !lost && !this.txClosed()) {
      // Bounded: a statement of the group may still wait for a lock (stop() gave up waiting for it). The
      // group cannot commit any more (requireCurrent), and the connection is ended after this.
      const done = await pTimeout(
        tx.unsafe("rollback").then(
          () => true,
          () => true,
        ),
        { milliseconds: 5000, message: false },
      ).catch(() => false);
      if (done && !this.txClosed()) tx.release();
    }
  }

  /**
   * The open group's connection, to send a statement on.
   * @throws an error with code CONNECTION_CLOSED when that connection was lost (the server rolled the group back).
   */
  private live(): TxSql {
    if (!this.tx) throw new Error("no apply transaction is open");
    if (this.txClosed())
      throw Object.assign(new Error("the apply session's connection was lost"), { code: "CONNECTION_CLOSED" });
    return this.tx;
  }

  /**
   * Applies one row change inside the open group. Whole rows go into the batch (written as a set at commit,
   * or when it grows past its limits); an UPDATE with unchanged TOASTed values is applied on its own, after
   * the batch is written.
   */
  private async applyChange(
    tx: TxSql,
    msg: Pgoutput.MessageInsert | Pgoutput.MessageUpdate | Pgoutput.MessageDelete,
  ): Promise<void> {
    const batch = this.batch!;
    const pk = this.m.key_columns;
    if (msg.tag === "insert") {
      batch.insert(msg.new as Tuple);
    } else if (msg.tag === "delete") {
      const oldRow = (msg.key ?? msg.old ?? null) as Tuple | null;
      if (!oldRow) throw new PgshiftError(`a DELETE without its key reached the stream (replica identity changed?)`);
      batch.delete(oldRow);
    } else {
      const n = msg.new as Tuple;
      const oldRow = (msg.key ?? msg.old ?? null) as Tuple | null;
      // The old key comes only when it changed (or with REPLICA IDENTITY FULL).
      const oldPk = oldRow && pk.every((c) => oldRow[c] !== undefined) ? oldRow : n;
      if (this.m.copy_columns.every((c) => n[c] !== undefined)) batch.update(oldPk, n);
      else {
        await batch.write(tx, this.group!.exact);
        await this.applyPartialUpdate(tx, oldPk, n);
        return;
      }
    }
    if (batch.changes >= BATCH_CHANGES || batch.bytes >= BATCH_CHARS) await batch.write(tx, this.group!.exact);
  }

  /**
   * An UPDATE whose unchanged TOASTed values were not sent (`n`: the new row, an unsent value undefined; `oldPk`:
   * the row's primary key before it, `n` when it did not change).
   *
   * Until the group is settled (groupModes: the copy may still be running, or a batch's ghost not yet cleaned),
   * the row is taken whole from the source (applyFromSource): what the shadow holds under the row's key may be a
   * batch's uncommitted copy or a ghost, older than the change, and merging the sent values into it would keep
   * its old unsent ones.
   *
   * Once settled: writes only what was sent and keeps the rest. When the primary key or the partition column
   * changed, the old version is removed and its unsent values carried over; a row in the shadow under neither
   * its old nor its new key is read from the source, overwriting whatever is in the way (its current version
   * is at least as new as anything in the shadow, and later changes replay on top).
   */
  private async applyPartialUpdate(tx: TxSql, oldPk: Tuple, n: Tuple): Promise<void> {
    if (!this.group!.settled) {
      await this.applyFromSource(tx, oldPk, n);
      return;
    }
    const m = this.m;
    const shadow = quoteQualified(m.partitioned);
    const pk = m.key_columns;
    const key = m.shadow_key;
    const cols = m.copy_columns;
    const known = cols.filter((c) => n[c] !== undefined);
    const knownRest = known.filter((c) => !key.includes(c));
    const setKnown =
      knownRest.length === 0
        ? "do nothing"
        : `do update set ${knownRest.map((c) => `${quoteIdent(c)} = excluded.${quoteIdent(c)}`).join(", ")}`;
    if (pk.some((c) => oldPk[c] !== n[c])) {
      // A new primary key: no other version of it may stay (exact mode relies on one version per key).
      const b = new Bindings();
      const text = `delete from ${shadow} where ${match(b, pk, n)} and ${match(b, key, n, "is distinct from")}`;
      await tx.unsafe(text, b.values, PREPARED);
    }
    const mb = new Bindings();
    const moved = `${match(mb, pk, oldPk)} and ${match(mb, key, n, "is distinct from")}`;
    const carry = cols.map((c) => (n[c] !== undefined ? mb.add(n[c]) : `gone.${quoteIdent(c)}`)).join(", ");
    const movedRows = await tx.unsafe(
      `with gone as (delete from ${shadow} where ${moved} returning *) ` +
        `insert into ${shadow} (${columnList(cols)}) select ${carry} from gone limit 1 ` +
        `on conflict (${columnList(key)}) ${setKnown}`,
      mb.values,
      PREPARED,
    );
    const ub = new Bindings();
    const set =
      knownRest.length === 0
        ? `${quoteIdent(key[0]!)} = ${quoteIdent(key[0]!)}`
        : knownRest.map((c) => `${quoteIdent(c)} = ${ub.add(n[c] ?? null)}`).join(", ");
    const inPlace = await tx.unsafe(`update ${shadow} set ${set} where ${match(ub, key, n)}`, ub.values, PREPARED);
    if (movedRows.count + inPlace.count === 0) {
      const ib = new Bindings();
      await tx.unsafe(
        `insert into ${shadow} (${columnList(cols)}) select ${columnList(cols)} from ${quoteQualified(m.original)} ` +
          `where ${match(ib, pk, n)} on conflict (${columnList(key)}) ${this.setAll()}`,
        ib.values,
        PREPARED,
      );
    }
  }

  /**
   * A partial UPDATE before the group is settled, in one statement (one snapshot): the row of the source under
   * the new primary key, read now, is upserted whole (`ON CONFLICT (shadow key) DO UPDATE` of every other
   * column), and every other version of that key, and of the old key when it changed, is deleted.
   *
   * Why that is right: the source's current version of the row is at least as new as the change (the stream
   * carries only committed transactions, and the statement's snapshot is taken after the change committed), and
   * every later change of the row comes after it in the stream and is applied on top, whole (INSERT, an UPDATE
   * with every value, this) or as a DELETE by key. So the last change of each row, applied once the source holds
   * its final version, writes that version whole. A copy the backfill has written and not committed is met by the
   * upsert, which waits for the batch and then overwrites it (`DO NOTHING` would keep the batch's older version:
   * the stale row this replaces); one the DELETE does not see (uncommitted) is a ghost if the source no longer has
   * its key, which the batch's cleanup removes (src/backfill/cleanup.ts). When the source no longer has the row
   * (deleted or given another key by a later transaction, which the stream applies next), its versions are
   * deleted and nothing is written.
   */
  private async applyFromSource(tx: TxSql, oldPk: Tuple, n: Tuple): Promise<void> {
    const m = this.m;
    const shadow = quoteQualified(m.partitioned);
    const pk = m.key_columns;
    const key = m.shadow_key;
    const cols = columnList(m.copy_columns);
    const b = new Bindings();
    const current = `select ${cols} from ${quoteQualified(m.original)} where ${match(b, pk, n)}`;
    const keys = [match(b, pk, n), ...(pk.some((c) => oldPk[c] !== n[c]) ? [match(b, pk, oldPk)] : [])];
    await tx.unsafe(
      `with cur as (${current}), ` +
        `gone as (delete from ${shadow} s where (${keys.join(" or ")}) ` +
        `and (${columnList(key, "s")}) not in (select ${columnList(key)} from cur)) ` +
        `insert into ${shadow} (${cols}) select ${cols} from cur on conflict (${columnList(key)}) ${this.setAll()}`,
      b.values,
      PREPARED,
    );
  }

  /** `do update set` every column outside the shadow's key to the proposed row's value (`do nothing`: none). */
  private setAll(): string {
    const rest = this.m.copy_columns.filter((c) => !this.m.shadow_key.includes(c));
    if (rest.length === 0) return "do nothing";
    return `do update set ${rest.map((c) => `${quoteIdent(c)} = excluded.${quoteIdent(c)}`).join(", ")}`;
  }

  /** Whether everything up to `lsn` is applied (or known to hold no change of the table). */
  reached(lsn: string): boolean {
    return this.applied >= lsnToBigInt(lsn);
  }

  /**
   * Waits until everything up to `lsn` is applied.
   * @returns false on timeout; @throws the stream's error if it stopped.
   */
  async waitFor(lsn: string, timeoutMs: number): Promise<boolean> {
    const until = Date.now() + timeoutMs;
    this.waiters++;
    try {
      // A group left open by the timer rule: commit it now rather than in up to 50 ms.
      void this.serially(() => this.commitIdleGroup());
      for (;;) {
        if (this.failed) throw this.failed;
        if (this.reached(lsn)) return true;
        if (Date.now() >= until) return false;
        await this.ping();
        await new Promise((r) => setTimeout(r, 20));
      }
    } finally {
      this.waiters--;
    }
  }

  /** Detaches from the slot and closes the connections; an open apply transaction is rolled back. */
  async stop(): Promise<void> {
    this.stopping = true;
    if (this.pingTimer) clearInterval(this.pingTimer);
    this.pingTimer = null;
    if (this.commitTimer) clearTimeout(this.commitTimer);
    this.commitTimer = null;
    const stream = this.stream;
    this.stream = null;
    await stream?.stop();
    // Let the message in hand finish before the connection goes: a query sent on a closing postgres.js
    // connection crashes the process (UPSTREAM.postgresJsWritesOnClosedReservedConnection, driver/upstream.ts).
    await pTimeout(this.inFlight, { milliseconds: 5000, message: false }).catch(() => {});
    await this.abandonGroup();
    const sql = this.sql;
    this.sql = null;
    await sql?.end({ timeout: 5 }).catch(() => {});
  }
}
