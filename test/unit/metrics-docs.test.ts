import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { createMetrics } from "../../src/observe/metrics.js";

/**
 * docs/metrics.md and docs/grafana-dashboard.json against the registry pgshift serves: every pgshift metric is
 * documented with its type and labels, and the dashboard queries only metrics that exist.
 */

const root = new URL("../../", import.meta.url);
const doc = readFileSync(new URL("docs/metrics.md", root), "utf8");
const dashboard = readFileSync(new URL("docs/grafana-dashboard.json", root), "utf8");

/** The metrics createMetrics() makes (prom-client's process metrics aside): name, type, label names. */
async function pgshiftMetrics(): Promise<{ name: string; type: string; labels: string[] }[]> {
  const { registry: _, ...metrics } = createMetrics();
  return Promise.all(
    Object.values(metrics).map(async (x) => {
      const { name, labelNames } = x as unknown as { name: string; labelNames: string[] };
      return { name, type: String((await x.get()).type), labels: labelNames };
    }),
  );
}

describe("metrics documentation", () => {
  it("lists every pgshift metric with its type and labels in docs/metrics.md", async () => {
    const metrics = await pgshiftMetrics();
    expect(metrics.length).toBeGreaterThan(20);
    for (const { name, type, labels } of metrics) {
      const row = doc.split("\n").find((l) => l.startsWith(`| \`${name}\` |`));
      expect(row, name).toBeDefined();
      const cells = row!.split("|").map((c) => c.trim());
      expect(cells[2], name).toBe(type);
      expect(cells[3]?.split(", "), name).toEqual(labels);
    }
    const documented = [...doc.matchAll(/^\| `(pgshift_\w+)` \|/gm)].map((x) => x[1]);
    expect(documented.sort()).toEqual(metrics.map((x) => x.name).sort());
  });

  it("docs/grafana-dashboard.json is JSON and queries only metrics pgshift serves", async () => {
    const d = JSON.parse(dashboard) as { panels: { targets?: { expr: string }[] }[] };
    const names = new Set((await createMetrics().registry.getMetricsAsJSON()).map((x) => x.name));
    const exprs = d.panels.flatMap((p) => p.targets ?? []).map((t) => t.expr);
    expect(exprs.length).toBeGreaterThan(20);
    const used = new Set(exprs.flatMap((e) => [...e.matchAll(/pgshift_\w+/g)].map((x) => x[0])));
    for (const u of used) expect(names.has(u.replace(/_(bucket|sum|count)$/, "")) || names.has(u), u).toBe(true);
    for (const line of dashboard.split("\n")) expect(line.length, line).toBeLessThanOrEqual(120);
  });
});
