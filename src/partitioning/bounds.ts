import { fitName, quoteLiteral } from "../names.js";
import { type LevelSpec, partitionMethod, type TimeInterval } from "./spec.js";

/**
 * One partition of the shadow table: its name and the SQL text of its bound
 * (`FOR VALUES FROM (...) TO (...)`, `FOR VALUES IN (...)`, `FOR VALUES WITH (...)` or `DEFAULT`).
 */
export interface PartitionDef {
  name: string;
  bound: string;
  isDefault: boolean;
  /** Two levels: this partition is partitioned itself (`PARTITION BY method (column)`), into `partitions`. */
  sub?: { method: "RANGE" | "LIST" | "HASH"; column: string; partitions: PartitionDef[] };
}

/**
 * A first-level partition with what a row's first-level value maps to, as the per-partition data of the second
 * level is keyed (levelGroupSql): the list value, the range's start (`YYYY-MM-DD`, or the integer), the hash
 * remainder. Absent for DEFAULT.
 */
export type KeyedPartition = PartitionDef & { key?: string };

/** What was read from the source to compute bounds. Time values are UTC text, integers decimal text. */
export interface DataRange {
  min: string | null;
  max: string | null;
  /** Distinct values for list partitioning, as text (NULL excluded). */
  values?: string[];
}

/** Value range of each integer type (docs: "Numeric Types"); bounds past it are written MINVALUE / MAXVALUE. */
const INTEGER_RANGE: Record<string, [bigint, bigint]> = {
  int2: [-32768n, 32767n],
  int4: [-2147483648n, 2147483647n],
  int8: [-9223372036854775808n, 9223372036854775807n],
};

/** Refuse more partitions than this: a spec that fine is almost always a mistake. */
export const MAX_PARTITIONS = 5000;

/** A UTC calendar day, the unit every time bound is aligned to. */
interface Day {
  y: number;
  m: number; // 1-12
  d: number;
}

function parseDay(text: string): Day | null {
  const m = /^(\d{4})-(\d{2})-(\d{2})/.exec(text);
  if (!m || / BC$/.test(text)) return null; // infinity, BC dates, 5-digit years: such rows go to DEFAULT
  return { y: Number(m[1]), m: Number(m[2]), d: Number(m[3]) };
}

function toUtc(day: Day): Date {
  // Not Date.UTC: it maps years 0-99 to 1900-1999.
  const date = new Date(0);
  date.setUTCFullYear(day.y, day.m - 1, day.d);
  return date;
}

function fromUtc(date: Date): Day {
  return { y: date.getUTCFullYear(), m: date.getUTCMonth() + 1, d: date.getUTCDate() };
}

const pad = (n: number, w = 2) => String(n).padStart(w, "0");
const dayText = (d: Day) => `${pad(d.y, 4)}-${pad(d.m)}-${pad(d.d)}`;

/** Start of the interval that contains `day` (weeks start on Monday, as date_trunc('week') does). */
export function truncateDay(day: Day, interval: TimeInterval): Day {
  switch (interval) {
    case "day":
      return day;
    case "week": {
      const date = toUtc(day);
      const dow = (date.getUTCDay() + 6) % 7; // Monday = 0
      date.setUTCDate(date.getUTCDate() - dow);
      return fromUtc(date);
    }
    case "month":
      return { y: day.y, m: day.m, d: 1 };
    case "quarter":
      return { y: day.y, m: Math.floor((day.m - 1) / 3) * 3 + 1, d: 1 };
    case "year":
      return { y: day.y, m: 1, d: 1 };
  }
}

/** The start of the next interval after `start` (which must be aligned). */
export function nextDay(start: Day, interval: TimeInterval): Day {
  const date = toUtc(start);
  switch (interval) {
    case "day":
      date.setUTCDate(date.getUTCDate() + 1);
      break;
    case "week":
      date.setUTCDate(date.getUTCDate() + 7);
      break;
    case "month":
      date.setUTCMonth(date.getUTCMonth() + 1);
      break;
    case "quarter":
      date.setUTCMonth(date.getUTCMonth() + 3);
      break;
    case "year":
      date.setUTCFullYear(date.getUTCFullYear() + 1);
      break;
  }
  return fromUtc(date);
}

function partitionSuffix(start: Day, interval: TimeInterval): string {
  switch (interval) {
    case "day":
    case "week":
      return `_p${pad(start.y, 4)}_${pad(start.m)}_${pad(start.d)}`;
    case "month":
      return `_p${pad(start.y, 4)}_${pad(start.m)}`;
    case "quarter":
      return `_p${pad(start.y, 4)}_q${(start.m - 1) / 3 + 1}`;
    case "year":
      return `_p${pad(start.y, 4)}`;
  }
}

/** SQL literal of a bound for the column type: dates plain, timestamptz pinned to UTC. */
function timeLiteral(day: Day, type: string): string {
  if (type === "date") return quoteLiteral(dayText(day));
  if (type === "timestamptz") return quoteLiteral(`${dayText(day)} 00:00:00+00`);
  return quoteLiteral(`${dayText(day)} 00:00:00`);
}

function floorDiv(a: bigint, b: bigint): bigint {
  const q = a / b;
  return a % b !== 0n && a < 0n !== b < 0n ? q - 1n : q;
}

function listSuffix(value: string): string {
  const s = value
    .toLowerCase()
    .replace(/[^a-z0-9_]+/g, "_")
    .replace(/^_+|_+$/g, "")
    .slice(0, 24);
  return s;
}

/**
 * Computes the partitions of the shadow table.
 *
 * - time ranges: from the interval holding `min` to the one holding `max`, then `premake` intervals past
 *   the later of `max` and `now`; bounds in UTC; plus DEFAULT.
 * - integer ranges: multiples of `width` from floor(min) to past max, then `premake` more; plus DEFAULT.
 * - list: one partition per existing value; plus DEFAULT (new values land there and `status` reports them).
 * - hash: `modulus` partitions, remainders 0..modulus-1 (hash partitioning has no DEFAULT).
 *
 * @param base the original table name (partitions keep it after cutover): `orders` -> `orders_p2024_01`.
 * @param columnType pg_type.typname of the partition column (date, timestamp, timestamptz, int2/4/8, ...).
 * @returns partitions in bound order, DEFAULT last. Names are at most 63 bytes and unique.
 * @throws Error when more than MAX_PARTITIONS would be created (the caller reports it as a blocker).
 */
export function computePartitions(
  spec: LevelSpec,
  base: string,
  columnType: string,
  data: DataRange,
  opts: { premake: number; now: Date },
): PartitionDef[] {
  return computeKeyedPartitions(spec, base, columnType, data, opts).map(({ key: _key, ...p }) => p);
}

/** computePartitions, each partition with its key (KeyedPartition), as computeSubPartitions takes them. */
export function computeKeyedPartitions(
  spec: LevelSpec,
  base: string,
  columnType: string,
  data: DataRange,
  opts: { premake: number; now: Date },
): KeyedPartition[] {
  const out: KeyedPartition[] = [];
  const defaultPartition: PartitionDef = { name: fitName(base, "_default"), bound: "DEFAULT", isDefault: true };
  switch (spec.strategy) {
    case "range": {
      const nowDay = fromUtc(opts.now);
      const minDay = (data.min !== null ? parseDay(data.min) : null) ?? nowDay;
      const maxDay = (data.max !== null ? parseDay(data.max) : null) ?? minDay;
      let start = truncateDay(minDay, spec.interval);
      const lastDataStart = truncateDay(maxDay, spec.interval);
      const nowStart = truncateDay(nowDay, spec.interval);
      const edge = toUtc(lastDataStart) > toUtc(nowStart) ? lastDataStart : nowStart;
      let stop = nextDay(edge, spec.interval);
      for (let i = 0; i < opts.premake; i++) stop = nextDay(stop, spec.interval);
      while (toUtc(start) < toUtc(stop)) {
        const end = nextDay(start, spec.interval);
        out.push({
          name: fitName(base, partitionSuffix(start, spec.interval)),
          bound: `FOR VALUES FROM (${timeLiteral(start, columnType)}) TO (${timeLiteral(end, columnType)})`,
          isDefault: false,
          key: dayText(start),
        });
        if (out.length > MAX_PARTITIONS) throw new Error(tooMany(spec));
        start = end;
      }
      out.push(defaultPartition);
      break;
    }
    case "range-int": {
      const width = BigInt(spec.width);
      const [typeMin, typeMax] = INTEGER_RANGE[columnType] ?? INTEGER_RANGE.int8!;
      const lit = (v: bigint) => (v > typeMax ? "MAXVALUE" : v < typeMin ? "MINVALUE" : String(v));
      const min = data.min !== null ? BigInt(data.min) : 0n;
      const max = data.max !== null ? BigInt(data.max) : min;
      let from = floorDiv(min, width) * width;
      const stop = (floorDiv(max, width) + 1n + BigInt(opts.premake)) * width;
      if ((stop - from) / width > BigInt(MAX_PARTITIONS)) throw new Error(tooMany(spec));
      while (from < stop && from <= typeMax) {
        const to = from + width;
        const label = from < 0n ? `m${-from}` : String(from);
        out.push({
          name: fitName(base, `_p${label}`),
          bound: `FOR VALUES FROM (${lit(from)}) TO (${lit(to)})`,
          isDefault: false,
          key: String(from),
        });
        from = to;
      }
      out.push(defaultPartition);
      break;
    }
    case "list": {
      const values = [...(data.values ?? [])].sort();
      if (values.length > MAX_PARTITIONS) throw new Error(tooMany(spec));
      const used = new Set<string>([defaultPartition.name]);
      values.forEach((v, i) => {
        const s = listSuffix(v);
        let name = fitName(base, s === "" ? `_p${i}` : `_p_${s}`);
        for (let n = 2; used.has(name); n++) name = fitName(base, `_p_${s}_${n}`);
        used.add(name);
        out.push({ name, bound: `FOR VALUES IN (${quoteLiteral(v)})`, isDefault: false, key: v });
      });
      out.push(defaultPartition);
      break;
    }
    case "hash":
      for (let r = 0; r < spec.modulus; r++) {
        out.push({
          name: fitName(base, `_p${r}`),
          bound: `FOR VALUES WITH (MODULUS ${spec.modulus}, REMAINDER ${r})`,
          isDefault: false,
          key: String(r),
        });
      }
      break;
    case "hash-rows":
    case "range-rows":
      throw new Error(`${spec.strategy} is computed per first-level partition: use computeSubPartitions`);
  }
  return out;
}

function tooMany(_spec: LevelSpec): string {
  return `the spec would create more than ${MAX_PARTITIONS} partitions; choose a coarser interval or width`;
}

/**
 * What the second level is computed from. Fixed forms (range, range-int, list, hash): `range`, the sub
 * column's min/max or distinct values over the whole table (every first-level partition gets the same
 * second level). Forms with rows=N: `groups`, per first-level key (PartitionDef.key; rows whose key matches no
 * planned partition are DEFAULT's), its row count and, for range-rows, the sub column's value at every N-th row
 * in ascending order (the 1st, the N+1-th, ...) and its largest value.
 */
export interface SubData {
  range?: DataRange;
  groups?: Map<string, GroupData>;
}

export interface GroupData {
  rows: number;
  /** range-rows: decimal text of the 1st, N+1-th, 2N+1-th ... value, ascending. */
  starts?: string[];
  /** range-rows: decimal text of the largest value. */
  max?: string;
}

/** Modulus of a `hash:<col>:rows=<N>` bucket set for a first-level partition of `rows` rows: ceil(rows / N), >= 1. */
export function hashModulus(rows: number, perBucket: bigint): number {
  if (rows <= 0) return 1;
  const m = (BigInt(Math.ceil(rows)) + perBucket - 1n) / perBucket;
  return Number(m < 1n ? 1n : m);
}

/**
 * The buckets of `range:<col>:rows=<N>` for one first-level partition (integer column of type `columnType`):
 * from MINVALUE to the N+1-th value, then from each N-th value to the next, the last to max + 1 (so each
 * holds N rows, fewer when values repeat), then `premake` buckets above the max, each as wide as N rows took
 * on average, then DEFAULT (rows past the premade buckets). A first-level partition without rows gets one
 * bucket over every value (FROM (MINVALUE) TO (MAXVALUE)) and no DEFAULT: nothing tells where to cut it.
 * @returns the buckets in bound order, DEFAULT last.
 */
export function rangeRowsBuckets(
  parent: string,
  columnType: string,
  perBucket: bigint,
  group: GroupData | undefined,
  premake: number,
): PartitionDef[] {
  const [typeMin, typeMax] = INTEGER_RANGE[columnType] ?? INTEGER_RANGE.int8!;
  const lit = (v: bigint) => (v > typeMax ? "MAXVALUE" : v < typeMin ? "MINVALUE" : String(v));
  const label = (v: bigint) => (v < 0n ? `m${-v}` : String(v));
  if (!group || group.rows === 0 || !group.starts || group.starts.length === 0 || group.max === undefined)
    return [{ name: fitName(parent, "_pall"), bound: "FOR VALUES FROM (MINVALUE) TO (MAXVALUE)", isDefault: false }];
  const starts = group.starts.map((v) => BigInt(v)).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  const max = BigInt(group.max);
  const cuts: bigint[] = [];
  for (const v of starts.slice(1)) if (v > (cuts.at(-1) ?? starts[0]!)) cuts.push(v);
  const out: PartitionDef[] = [];
  let from: bigint | null = null; // null: MINVALUE
  const edges = [...cuts, max + 1n];
  for (const to of edges) {
    out.push({
      name: fitName(parent, from === null ? "_pmin" : `_p${label(from)}`),
      bound: `FOR VALUES FROM (${from === null ? "MINVALUE" : lit(from)}) TO (${lit(to)})`,
      isDefault: false,
    });
    from = to;
  }
  // Premade buckets: the value span N rows took on average.
  const span = max + 1n - starts[0]!;
  let width = (span * perBucket) / BigInt(Math.max(1, Math.ceil(group.rows)));
  if (width < 1n) width = 1n;
  for (let i = 0; i < premake && from! <= typeMax; i++) {
    const to: bigint = from! + width;
    out.push({
      name: fitName(parent, `_p${label(from!)}`),
      bound: `FOR VALUES FROM (${lit(from!)}) TO (${lit(to)})`,
      isDefault: false,
    });
    from = to;
  }
  if (from! <= typeMax) out.push({ name: fitName(parent, "_default"), bound: "DEFAULT", isDefault: true });
  return out;
}

/**
 * Adds the second level (`sub`) under every first-level partition (DEFAULT's included) and returns the first
 * level, without the keys (computeKeyedPartitions gives them). rows=N forms are sized from `data.groups` (the
 * DEFAULT partition's group is every row whose key matches no other partition; a hash first level spreads its
 * rows evenly); fixed forms repeat the
 * same bounds (computePartitions over `data.range`) under each. Names are the parent's with the child's
 * suffix (`orders_p_42_p0`), made unique over both levels.
 * @throws Error when both levels together would make more than MAX_PARTITIONS partitions, or when a form
 *   needs data that was not given (the caller reports it as a blocker).
 */
export function computeSubPartitions(
  sub: LevelSpec,
  level1: KeyedPartition[],
  columnType: string,
  data: SubData,
  opts: { premake: number; now: Date },
): PartitionDef[] {
  const method = partitionMethod(sub);
  const known = new Set(level1.flatMap((p) => (p.key !== undefined ? [p.key] : [])));
  const groups = data.groups ?? new Map<string, GroupData>();
  let unmatched = 0;
  for (const [k, g] of groups) if (!known.has(k)) unmatched += g.rows;
  const used = new Set(level1.map((p) => p.name));
  let total = level1.length;
  for (const p of level1) {
    const group = p.isDefault ? { rows: unmatched } : p.key !== undefined ? groups.get(p.key) : undefined;
    let children: PartitionDef[];
    if (sub.strategy === "hash-rows") {
      const m = hashModulus(group?.rows ?? 0, BigInt(sub.rows));
      children = Array.from({ length: m }, (_, r) => ({
        name: fitName(p.name, `_p${r}`),
        bound: `FOR VALUES WITH (MODULUS ${m}, REMAINDER ${r})`,
        isDefault: false,
      }));
    } else if (sub.strategy === "range-rows") {
      children = rangeRowsBuckets(p.name, columnType, BigInt(sub.rows), group, opts.premake);
    } else {
      if (!data.range) throw new Error(`no data range for the second level ${sub.strategy}`);
      children = computePartitions(sub, p.name, columnType, data.range, opts);
    }
    for (const c of children) {
      let name = c.name;
      for (let n = 2; used.has(name); n++) name = fitName(c.name, `_${n}`);
      used.add(name);
      c.name = name;
    }
    total += children.length;
    if (total > MAX_PARTITIONS)
      throw new Error(
        `the two levels would create more than ${MAX_PARTITIONS} partitions; choose a coarser spec or a larger rows=N`,
      );
    p.sub = { method, column: sub.column, partitions: children };
  }
  return level1.map(({ key: _key, ...p }) => p);
}

/** Every partition of both levels, each first-level partition followed by its own partitions. */
export function flattenPartitions(partitions: readonly PartitionDef[]): PartitionDef[] {
  return partitions.flatMap((p) => [p, ...(p.sub ? flattenPartitions(p.sub.partitions) : [])]);
}
