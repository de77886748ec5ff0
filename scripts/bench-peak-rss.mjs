/**
 * Preloaded (`node --import`) into the pgshift processes a benchmark runs (runPgshift in bench-common.ts): when
 * the process exits, writes its peak resident set size in bytes (getrusage's maxRSS, the kernel's high-water
 * mark, VmHWM) to the file named by PGSHIFT_BENCH_PEAK_RSS_FILE, then, to `<that file>.json`, its V8 heap: the
 * peak figures beside what is still alive once a full garbage collection ran (when node runs with --expose-gc), which
 * tells memory kept (a leak) from garbage not yet collected, and the peaks of the V8 heap and of the memory outside
 * it (Buffers), read every 100 ms, and V8's own peak of memory it allocated outside its heap (compilers' zones), which
 * tell where a peak of the RSS came from. Does nothing without that variable.
 */
import { writeFileSync } from "node:fs";
import { memoryUsage, resourceUsage } from "node:process";
import { getHeapStatistics } from "node:v8";

const file = process.env.PGSHIFT_BENCH_PEAK_RSS_FILE;
const peak = { heapTotal: 0, external: 0, arrayBuffers: 0 };
const sample = () => {
  const m = memoryUsage();
  peak.heapTotal = Math.max(peak.heapTotal, m.heapTotal);
  peak.external = Math.max(peak.external, m.external);
  peak.arrayBuffers = Math.max(peak.arrayBuffers, m.arrayBuffers);
};
if (file) setInterval(sample, 100).unref();
if (file)
  process.on("exit", () => {
    try {
      writeFileSync(file, String(resourceUsage().maxRSS * 1024));
      sample();
      const before = memoryUsage();
      const gc = /** @type {undefined | (() => void)} */ (globalThis.gc);
      gc?.();
      const after = gc ? memoryUsage() : null;
      writeFileSync(
        `${file}.json`,
        JSON.stringify({
          heapTotalBytes: before.heapTotal,
          heapUsedBytes: before.heapUsed,
          liveHeapBytes: after ? after.heapUsed : null,
          externalBytes: before.external,
          peakHeapTotalBytes: peak.heapTotal,
          peakExternalBytes: peak.external,
          peakArrayBuffersBytes: peak.arrayBuffers,
          peakMallocedBytes: getHeapStatistics().peak_malloced_memory,
        }),
      );
    } catch {
      // the benchmark falls back to what it polled from /proc
    }
  });
