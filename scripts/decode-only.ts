/**
 * The cheapest consumer of a logical replication slot, for bench-overhead's floor setup (e): streams the
 * slot with pgoutput, discards every message, and confirms what it received every 100 ms. What
 * a run costs with it attached is what decoding and sending the table's changes costs, before anything is
 * applied: no logical mirror can cost less.
 *
 *   node --import tsx scripts/decode-only.ts <url> <slot> <publication>
 *
 * Runs until SIGTERM or SIGINT.
 */
import { LogicalReplicationService, PgoutputPlugin } from "pg-logical-replication";

const [url, slot, publication] = process.argv.slice(2);
if (!url || !slot || !publication) {
  process.stderr.write("usage: decode-only.ts <url> <slot> <publication>\n");
  process.exit(2);
}
// Confirms the last position received every 100 ms (the library's automatic mode would send a status
// message to the server for every message it receives, which costs both sides more than the decoding).
const service = new LogicalReplicationService(
  { connectionString: url, application_name: "bench-decode-only" },
  { acknowledge: { auto: false, timeoutSeconds: 0 } },
);
let last: string | null = null;
service.on("data", (lsn: string) => {
  last = lsn;
});
service.on("heartbeat", (lsn: string, _ts: number, shouldRespond: boolean) => {
  if (shouldRespond) void service.acknowledge(last ?? lsn, true);
});
setInterval(() => {
  if (last !== null) void service.acknowledge(last);
}, 100);
service.on("error", (err: Error) => {
  process.stderr.write(`decode-only: ${err.message}\n`);
  process.exit(1);
});
const stop = () => void service.stop().finally(() => process.exit(0));
process.once("SIGTERM", stop);
process.once("SIGINT", stop);
await service.subscribe(new PgoutputPlugin({ protoVersion: 1, publicationNames: [publication] }), slot);
