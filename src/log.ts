import { destination, type Logger, pino } from "pino";

/**
 * The process logger: pretty lines on a terminal, one JSON object per line otherwise
 * (what log collectors expect). Level from PGSHIFT_LOG_LEVEL (default "info").
 * Logs go to stderr so that `--json` output on stdout stays machine-readable.
 */
export function createLogger(opts: { level?: string; pretty?: boolean } = {}): Logger {
  const level = opts.level ?? process.env.PGSHIFT_LOG_LEVEL ?? "info";
  const pretty = opts.pretty ?? Boolean(process.stderr.isTTY);
  if (pretty) {
    return pino({
      level,
      transport: {
        target: "pino-pretty",
        options: { destination: 2, colorize: true, ignore: "pid,hostname", translateTime: "HH:MM:ss" },
      },
    });
  }
  return pino({ level, base: { app: "pgshift" } }, destination(2));
}

let current: Logger | undefined;

/** The shared logger; created on first use. */
export function log(): Logger {
  current ??= createLogger();
  return current;
}

/** Replace the shared logger (tests use a silent one). */
export function setLogger(logger: Logger): void {
  current = logger;
}
