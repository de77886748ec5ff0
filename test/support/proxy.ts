import net from "node:net";

/**
 * A TCP proxy in front of a PostgreSQL server, for tests that need a connection held at a chosen moment,
 * as a slow network would: every connection is forwarded as it is, except that, while `holdReplication`
 * is on, a replication connection's startup packet (the one that carries `replication`) is kept back
 * until release() is called. Everything the client sends meanwhile is kept back too, then forwarded in order.
 */
export interface Proxy {
  /** The server's URL with the proxy's port. */
  url: string;
  /** Resolves when a replication connection is being held. */
  held(): Promise<void>;
  /** Forwards what the held connections sent, and holds no more. */
  release(): void;
  close(): Promise<void>;
}

export async function startProxy(serverUrl: string, opts: { holdReplication: boolean }): Promise<Proxy> {
  const target = new URL(serverUrl);
  const host = target.hostname;
  const port = Number(target.port || 5432);
  let holding = opts.holdReplication;
  const waiting: Array<() => void> = [];
  let heldOne: () => void = () => {};
  let heldPromise = new Promise<void>((r) => (heldOne = r));
  const sockets = new Set<net.Socket>();

  const server = net.createServer((client) => {
    sockets.add(client);
    const upstream = net.connect(port, host);
    sockets.add(upstream);
    const kept: Buffer[] = [];
    let first = true;
    let held = false;
    const forward = () => {
      held = false;
      for (const b of kept.splice(0)) upstream.write(b);
    };
    client.on("data", (chunk: Buffer) => {
      if (first) {
        first = false;
        // The startup packet: length, protocol 3.0, then name/value pairs ("replication", "database", ...).
        if (holding && chunk.includes(Buffer.from("replication\0"))) {
          held = true;
          kept.push(chunk);
          waiting.push(forward);
          heldOne();
          return;
        }
      }
      if (held) kept.push(chunk);
      else upstream.write(chunk);
    });
    upstream.on("data", (chunk: Buffer) => client.write(chunk));
    const close = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on("error", close);
    upstream.on("error", close);
    // A client that ends while held: its bytes (a Terminate, say) still reach the server, then the end.
    client.on("end", () => {
      if (held) waiting.push(() => upstream.end());
      else upstream.end();
    });
    upstream.on("end", () => client.end());
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  const addr = server.address() as net.AddressInfo;
  const url = new URL(serverUrl);
  url.hostname = "127.0.0.1";
  url.port = String(addr.port);
  return {
    url: url.toString(),
    held: () => heldPromise,
    release: () => {
      holding = false;
      for (const f of waiting.splice(0)) f();
      heldPromise = new Promise<void>((r) => (heldOne = r));
    },
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}
