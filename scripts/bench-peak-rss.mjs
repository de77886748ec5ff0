/**
 * Preloaded (`node --import`) into the pgshift processes a benchmark runs (runPgshift in bench-common.ts): when
 * the process exits, writes its peak resident set size in bytes (getrusage's maxRSS, the kernel's high-water
 * mark, VmHWM) to the file named by PGSHIFT_BENCH_PEAK_RSS_FILE. Does nothing without that variable.
 */
import { writeFileSync } from "node:fs";
import { resourceUsage } from "node:process";

const file = process.env.PGSHIFT_BENCH_PEAK_RSS_FILE;
if (file)
  process.on("exit", () => {
    try {
      writeFileSync(file, String(resourceUsage().maxRSS * 1024));
    } catch {
      // the benchmark falls back to what it polled from /proc
    }
  });
