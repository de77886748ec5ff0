/**
 * Every carrier (carrier.ts) in the order a switch runs them: views are re-created after the objects they may
 * read are in place, foreign keys and publications last.
 */
import type { TableFacts } from "../catalog/inspect.js";
import type { AnySql } from "../db.js";
import type { Migration } from "../migration/state.js";
import type { QualifiedName } from "../names.js";
import type { PartitionSpec } from "../partitioning/spec.js";
import type { Carried, Carrier, CarrierPlan, SwitchTo } from "./carrier.js";
import { foreignKeys } from "./foreign-keys.js";
import { functionsCarrier } from "./functions.js";
import { materializedViewsCarrier } from "./materialized-views.js";
import { policiesCarrier } from "./policies.js";
import { publications } from "./publications.js";
import { triggersCarrier } from "./triggers.js";
import { viewsCarrier } from "./views.js";

export type { Carried, Carrier, CarrierPlan, SwitchTo } from "./carrier.js";

/** The carriers, in the order their statements run in a switch's transaction. */
export const CARRIERS: readonly Carrier[] = [
  triggersCarrier,
  policiesCarrier,
  functionsCarrier,
  viewsCarrier,
  materializedViewsCarrier,
  foreignKeys,
  publications,
];

/** What `plan` says about every kind of dependent object (CarrierPlan), merged in carrier order. */
export async function planDependents(sql: AnySql, facts: TableFacts, spec: PartitionSpec): Promise<CarrierPlan> {
  const out: CarrierPlan = { lines: [], blockers: [] };
  for (const c of CARRIERS) {
    const p = await c.plan(sql, facts, spec);
    out.lines.push(...p.lines);
    out.blockers.push(...p.blockers);
  }
  return out;
}

/** The pg_depend keys (`<catalog>/<oid>`) of every object on `live` some carrier moves (Carrier.claims). */
export async function claimedObjects(sql: AnySql, live: QualifiedName): Promise<Set<string>> {
  const out = new Set<string>();
  for (const c of CARRIERS) for (const k of await c.claims(sql, live)) out.add(k);
  return out;
}

/** What the switch of `m` to `to` carries over, carrier by carrier (Carrier.carry). Reads only. */
export async function carryDependents(sql: AnySql, m: Migration, to: SwitchTo): Promise<Carried[]> {
  const out: Carried[] = [];
  for (const c of CARRIERS) out.push(...(await c.carry(sql, m, to)));
  return out;
}
