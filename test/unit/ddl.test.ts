import { describe, expect, it } from "vitest";
import type { ColumnFacts, IndexFacts, TableFacts } from "../../src/catalog/inspect.js";
import {
  afterCopySql,
  copyColumns,
  deferredIndexSql,
  extendIndexKey,
  fidelityBlockers,
  fidelityWarnings,
  liveNamesSql,
  partitionIndexName,
  shadowDdl,
  shadowKey,
} from "../../src/ddl/shadow.js";
import {
  installTriggerMirrorSql,
  MIRROR_TRIGGER,
  mirrorFunctionSql,
  removeMirrorTriggerSql,
  removeTruncateGuardSql,
  TRUNCATE_TRIGGER,
  type TriggerMirrorSpec,
} from "../../src/mirror/trigger.js";
import { quoteIdent } from "../../src/names.js";
import { computePartitions } from "../../src/partitioning/bounds.js";
import { parsePartitionSpec } from "../../src/partitioning/spec.js";

const TABLE = { schema: "My Schema", name: "Order Items" };
const SHADOW = { schema: "My Schema", name: "Order Items_pgshift_shadow" };
const SRC = '"My Schema"."Order Items"';
const SHD = '"My Schema"."Order Items_pgshift_shadow"';
const OID = 16384;

function column(name: string, attnum: number, typeName: string, extra: Partial<ColumnFacts> = {}): ColumnFacts {
  return {
    name,
    attnum,
    typeName,
    formattedType: typeName,
    notNull: false,
    generated: "",
    identity: "",
    sequence: null,
    statisticsTarget: null,
    options: [],
    ...extra,
  };
}

function index(name: string, tail: string, keyColumns: (string | null)[], extra: Partial<IndexFacts> = {}): IndexFacts {
  return {
    name,
    isPrimary: false,
    isUnique: false,
    constraintName: null,
    constraintType: null,
    tail,
    keyColumns,
    constraintDef: null,
    deferrable: false,
    deferred: false,
    comment: null,
    constraintComment: null,
    isReplicaIdentity: false,
    isClustered: false,
    ...extra,
  };
}

const WEIRD_TAIL = `btree ("we(ird, col" text_pattern_ops) WHERE (note <> 'a)b'::text)`;

function facts(overrides: Partial<TableFacts> = {}): TableFacts {
  return {
    table: TABLE,
    oid: 16384,
    relkind: "r",
    isPartition: false,
    persistence: "p",
    owner: "app_owner",
    isOwner: true,
    canCreateInSchema: true,
    reloptions: ["fillfactor=80"],
    comment: "Bob's order lines",
    estimatedRows: 1000,
    totalBytes: 65536,
    columns: [
      column("id", 1, "int8", {
        notNull: true,
        identity: "a",
        sequence: { schema: "My Schema", name: "Order Items_id_seq" },
      }),
      column("line_no", 2, "int4", {
        notNull: true,
        sequence: { schema: "My Schema", name: "Order Items_line_no_seq" },
      }),
      column("order", 3, "int4", { notNull: true }),
      column("created_at", 4, "timestamptz", { notNull: true }),
      column("email", 5, "text"),
      column("note", 6, "text"),
      column("we(ird, col", 7, "text"),
      column("total", 8, "numeric", { formattedType: "numeric(12,2)", generated: "s" }),
    ],
    keyColumns: ["id"],
    keyIndexName: "Order Items_pkey",
    indexes: [
      index("Order Items_pkey", "btree (id)", ["id"], {
        isPrimary: true,
        isUnique: true,
        constraintName: "Order Items_pkey",
        constraintType: "p",
      }),
      index("order_items_email_key", "btree (email)", ["email"], {
        isUnique: true,
        constraintName: "order_items_email_key",
        constraintType: "u",
      }),
      index("order_items_lower_email_idx", "btree (lower(email))", [null]),
      index("order_items_order_idx", `btree ("order") WHERE (note IS NOT NULL)`, ["order"]),
      index("order_items_weird_idx", WEIRD_TAIL, ["we(ird, col"], { isUnique: true }),
      index("order_items_created_at_idx", "btree (created_at DESC)", ["created_at"]),
      index("order_items_created_order_key", `btree (created_at, "order")`, ["created_at", "order"], {
        isUnique: true,
      }),
    ],
    foreignKeys: [
      {
        name: "Order Items_order_fkey",
        definition: 'FOREIGN KEY ("order") REFERENCES "My Schema"."Orders"(id) ON DELETE CASCADE',
        valid: true,
        comment: null,
      },
    ],
    checks: [],
    columnGrants: [],
    ownerRevoked: [],
    rowSecurity: false,
    forceRowSecurity: false,
    bypassesRowSecurity: true,
    replicaIdentity: "d",
    statistics: [],
    grants: [
      { grantee: "Reporting Role", privilege: "SELECT", grantable: false },
      { grantee: "app_writer", privilege: "INSERT", grantable: true },
      { grantee: null, privilege: "SELECT", grantable: false },
    ],
    dependents: {
      views: [],
      rules: [],
      policies: [],
      incomingForeignKeys: [],
      publications: [],
      triggers: [],
      inheritance: [],
      exclusionConstraints: [],
      columnPrivileges: [],
    },
    serverVersionNum: 170000,
    ...overrides,
  };
}

const SPEC = parsePartitionSpec("range:created_at:month");
const PARTITIONS = computePartitions(
  SPEC,
  TABLE.name,
  "timestamptz",
  { min: "2024-01-03 00:00:00+00", max: "2024-02-10 00:00:00+00" },
  {
    premake: 0,
    now: new Date("2024-02-15T00:00:00Z"),
  },
);

describe("extendIndexKey", () => {
  it("appends quoted columns to the key list", () => {
    expect(extendIndexKey("btree (email)", ["created_at"])).toBe('btree (email, "created_at")');
    expect(extendIndexKey("btree (a, b)", ["x", "Y z"])).toBe('btree (a, b, "x", "Y z")');
  });

  it("returns the tail unchanged when nothing is added", () => {
    expect(extendIndexKey(WEIRD_TAIL, [])).toBe(WEIRD_TAIL);
    expect(extendIndexKey("no parens at all", [])).toBe("no parens at all");
  });

  it("keeps INCLUDE and WHERE after the key list", () => {
    expect(extendIndexKey("btree (a) INCLUDE (b, c) WHERE (d > 0)", ["p"])).toBe(
      'btree (a, "p") INCLUDE (b, c) WHERE (d > 0)',
    );
    expect(extendIndexKey("btree (a DESC NULLS LAST) NULLS NOT DISTINCT", ["p"])).toBe(
      'btree (a DESC NULLS LAST, "p") NULLS NOT DISTINCT',
    );
    expect(extendIndexKey("btree (a) WITH (fillfactor='70') TABLESPACE ts", ["p"])).toBe(
      `btree (a, "p") WITH (fillfactor='70') TABLESPACE ts`,
    );
  });

  it("skips parentheses and commas inside quoted identifiers and string literals", () => {
    expect(extendIndexKey(WEIRD_TAIL, ["created_at"])).toBe(
      `btree ("we(ird, col" text_pattern_ops, "created_at") WHERE (note <> 'a)b'::text)`,
    );
    expect(extendIndexKey(`btree ("a)""b(" )`, ["p"])).toBe(`btree ("a)""b(" , "p")`);
    expect(extendIndexKey(`btree ((x || ')'::text))`, ["p"])).toBe(`btree ((x || ')'::text), "p")`);
    expect(extendIndexKey(`btree (COALESCE(x, ''::text), y)`, ["p"])).toBe(`btree (COALESCE(x, ''::text), y, "p")`);
    expect(extendIndexKey(`btree ((x = 'it''s ) here'::text))`, ["p"])).toBe(`btree ((x = 'it''s ) here'::text), "p")`);
    expect(extendIndexKey(`btree (("""" || ''''::text))`, ["p"])).toBe(`btree (("""" || ''''::text), "p")`);
  });

  it("handles nested expressions", () => {
    expect(extendIndexKey("btree (lower(email), date_trunc('day'::text, ts))", ["p"])).toBe(
      `btree (lower(email), date_trunc('day'::text, ts), "p")`,
    );
    expect(extendIndexKey("btree (((a + b) * (c - d)))", ["p"])).toBe('btree (((a + b) * (c - d)), "p")');
  });

  it("quotes odd extra column names", () => {
    expect(extendIndexKey("btree (a)", ['we"ird'])).toBe('btree (a, "we""ird")');
  });

  it("throws on a tail without or with unbalanced parentheses", () => {
    expect(() => extendIndexKey("btree a", ["p"])).toThrow(/unexpected index definition/);
    expect(() => extendIndexKey("btree (a", ["p"])).toThrow(/unbalanced index definition/);
    expect(() => extendIndexKey(`btree ("a)`, ["p"])).toThrow(/unbalanced index definition/);
  });
});

describe("shadowKey", () => {
  it("appends the partition column when the key lacks it", () => {
    expect(shadowKey(["id"], "created_at")).toEqual(["id", "created_at"]);
    expect(shadowKey(["tenant", "id"], "Created At")).toEqual(["tenant", "id", "Created At"]);
  });

  it("keeps the key as is when it holds the partition column", () => {
    expect(shadowKey(["id", "created_at"], "created_at")).toEqual(["id", "created_at"]);
    expect(shadowKey(["created_at", "id"], "created_at")).toEqual(["created_at", "id"]);
  });

  it("returns a copy", () => {
    const key = ["id", "p"];
    const out = shadowKey(key, "p");
    out.push("x");
    expect(key).toEqual(["id", "p"]);
  });

  it("compares names exactly (case matters)", () => {
    expect(shadowKey(["Created_At"], "created_at")).toEqual(["Created_At", "created_at"]);
  });
});

describe("copyColumns", () => {
  it("every column but generated ones, in table order", () => {
    expect(copyColumns(facts())).toEqual(["id", "line_no", "order", "created_at", "email", "note", "we(ird, col"]);
  });
});

describe("shadowDdl", () => {
  const ddl = shadowDdl(facts(), SPEC, PARTITIONS, { source: TABLE, shadow: SHADOW });
  const st = ddl.statements;

  it("creates the shadow with LIKE and PARTITION BY first", () => {
    expect(st[0]).toBe(
      `CREATE TABLE ${SHD} (LIKE ${SRC} INCLUDING DEFAULTS INCLUDING COMMENTS INCLUDING STORAGE ` +
        `INCLUDING COMPRESSION INCLUDING GENERATED) PARTITION BY RANGE ("created_at")`,
    );
    // Checks (NOT VALID ones must wait for the copy) and statistics (their names) are added one by one.
    expect(st[0]).not.toMatch(
      /INCLUDING IDENTITY|INCLUDING INDEXES|INCLUDING ALL|INCLUDING CONSTRAINTS|INCLUDING STATISTICS/,
    );
    expect(st[1]).toBe(`ALTER TABLE ${SHD} OWNER TO "app_owner"`);
  });

  it("uses the method of each strategy", () => {
    const list = shadowDdl(facts(), parsePartitionSpec("list:order"), [], { source: TABLE, shadow: SHADOW });
    expect(list.statements[0]!.endsWith(`PARTITION BY LIST ("order")`)).toBe(true);
    const hash = shadowDdl(facts(), parsePartitionSpec('hash:"we(ird, col":4'), [], { source: TABLE, shadow: SHADOW });
    expect(hash.statements[0]!.endsWith(`PARTITION BY HASH ("we(ird, col")`)).toBe(true);
    const int = shadowDdl(facts(), parsePartitionSpec("range:line_no:100"), [], { source: TABLE, shadow: SHADOW });
    expect(int.statements[0]!.endsWith(`PARTITION BY RANGE ("line_no")`)).toBe(true);
  });

  it(
    "gives the identity column a default that draws from the identity sequence, " + "and leaves serial columns to LIKE",
    () => {
      const defaults = st.filter((s) => s.includes("SET DEFAULT"));
      expect(defaults).toEqual([`ALTER TABLE ${SHD} ALTER COLUMN "id" SET DEFAULT "pgshift"."nextval_${OID}_1"()`]);
      expect(st).toContain(
        `CREATE OR REPLACE FUNCTION "pgshift"."nextval_${OID}_1"() RETURNS bigint LANGUAGE sql SECURITY DEFINER SET ` +
          `search_path = pg_catalog, pg_temp ` +
          `AS $pgshift$ SELECT nextval('"My Schema"."Order Items_id_seq"'::regclass) $pgshift$`,
      );
      expect(st.some((s) => s.includes("line_no_seq"))).toBe(false);
    },
  );

  it("quotes a sequence name with a quote or backslash as a literal", () => {
    const f = facts({
      columns: [
        column("id", 1, "int8", { notNull: true, identity: "d", sequence: { schema: "s", name: "it's\\seq" } }),
      ],
      indexes: [],
      grants: [],
      foreignKeys: [],
      comment: null,
      reloptions: [],
    });
    const out = shadowDdl(f, parsePartitionSpec("hash:id:2"), [], { source: TABLE, shadow: SHADOW }).statements;
    expect(out).toEqual([
      `CREATE TABLE ${SHD} (LIKE ${SRC} INCLUDING DEFAULTS INCLUDING COMMENTS INCLUDING STORAGE INCLUDING ` +
        `COMPRESSION INCLUDING GENERATED) PARTITION BY HASH ("id")`,
      `ALTER TABLE ${SHD} OWNER TO "app_owner"`,
      `CREATE OR REPLACE FUNCTION "pgshift"."nextval_${OID}_1"() RETURNS bigint LANGUAGE sql SECURITY DEFINER SET ` +
        `search_path = pg_catalog, pg_temp AS $pgshift$ SELECT nextval(E'"s"."it''s\\\\seq"'::regclass) $pgshift$`,
      `ALTER TABLE ${SHD} ALTER COLUMN "id" SET DEFAULT "pgshift"."nextval_${OID}_1"()`,
    ]);
  });

  it("copies the table comment, quote doubled", () => {
    expect(st.filter((s) => s.startsWith("COMMENT"))).toEqual([`COMMENT ON TABLE ${SHD} IS 'Bob''s order lines'`]);
    const none = shadowDdl(facts({ comment: null }), SPEC, PARTITIONS, { source: TABLE, shadow: SHADOW });
    expect(none.statements.some((s) => s.startsWith("COMMENT"))).toBe(false);
  });

  it("creates each partition in the shadow's schema with the source's storage parameters", () => {
    const creates = st.filter((s) => s.includes("PARTITION OF"));
    expect(creates).toEqual([
      `CREATE TABLE "My Schema"."Order Items_p2024_01" PARTITION OF ${SHD} FOR VALUES FROM ('2024-01-01 ` +
        `00:00:00+00') TO ('2024-02-01 00:00:00+00') WITH (fillfactor=80)`,
      `CREATE TABLE "My Schema"."Order Items_p2024_02" PARTITION OF ${SHD} FOR VALUES FROM ('2024-02-01 ` +
        `00:00:00+00') TO ('2024-03-01 00:00:00+00') WITH (fillfactor=80)`,
      `CREATE TABLE "My Schema"."Order Items_default" PARTITION OF ${SHD} DEFAULT WITH (fillfactor=80)`,
    ]);
  });

  it("joins several storage parameters and omits WITH when there are none", () => {
    const two = shadowDdl(facts({ reloptions: ["fillfactor=80", "autovacuum_enabled=false"] }), SPEC, PARTITIONS, {
      source: TABLE,
      shadow: SHADOW,
    });
    expect(
      two.statements
        .find((s) => s.includes("PARTITION OF"))!
        .endsWith(" WITH (fillfactor=80, autovacuum_enabled=false)"),
    ).toBe(true);
    const none = shadowDdl(facts({ reloptions: [] }), SPEC, PARTITIONS, { source: TABLE, shadow: SHADOW });
    expect(none.statements.find((s) => s.includes("PARTITION OF"))).toBe(
      `CREATE TABLE "My Schema"."Order Items_p2024_01" PARTITION OF ${SHD} FOR VALUES FROM ('2024-01-01 ` +
        `00:00:00+00') TO ('2024-02-01 00:00:00+00')`,
    );
    expect(none.statements.some((s) => s.includes("WITH ("))).toBe(false);
  });

  it("extends the primary key with the partition column", () => {
    expect(st.filter((s) => s.includes("PRIMARY KEY"))).toEqual([
      `ALTER TABLE ${SHD} ADD CONSTRAINT "Order Items_pkey_part" PRIMARY KEY ("id", "created_at")`,
    ]);
    expect(ddl.indexRenames[0]).toEqual({ from: "Order Items_pkey_part", to: "Order Items_pkey" });
    expect(ddl.indexRenames.map((r) => r.to)).toEqual(facts().indexes.map((i) => i.name));
  });

  it("defers every secondary index to after the copy, extending unique ones that lack the partition column", () => {
    expect(st.filter((s) => s.includes(" INDEX "))).toEqual([]);
    expect(ddl.deferredIndexes.map((d) => [d.unique, d.definition])).toEqual([
      [true, `btree (email, "created_at")`],
      [false, `btree (lower(email))`],
      [false, `btree ("order") WHERE (note IS NOT NULL)`],
      [true, `btree ("we(ird, col" text_pattern_ops, "created_at") WHERE (note <> 'a)b'::text)`],
      [false, `btree (created_at DESC)`],
      [true, `btree (created_at, "order")`],
    ]);
    for (const d of ddl.deferredIndexes) expect(d.name.endsWith("_part")).toBe(true);
  });

  it("builds deferred indexes ON ONLY the parent, then CONCURRENTLY per partition, then attaches them", () => {
    const idx = ddl.deferredIndexes[0]!;
    const d = deferredIndexSql(
      "My Schema",
      "Order Items_pgshift_shadow",
      ["Order Items_p2024_01", "Order Items_default"],
      idx,
    );
    expect(d.parent).toBe(
      `CREATE UNIQUE INDEX IF NOT EXISTS ${quoteIdent(idx.name)} ON ONLY ${SHD} USING btree (email, "created_at")`,
    );
    expect(d.perPartition).toHaveLength(2);
    const p = d.perPartition[0]!;
    expect(p.index).toBe(partitionIndexName("Order Items_p2024_01", idx.name));
    expect(p.create).toBe(
      `CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ${quoteIdent(p.index)} ON "My Schema"."Order Items_p2024_01" ` +
        `USING btree (email, "created_at")`,
    );
    expect(p.attach).toBe(
      `ALTER INDEX "My Schema".${quoteIdent(idx.name)} ATTACH PARTITION "My Schema".${quoteIdent(p.index)}`,
    );
    // distinct parents give distinct partition index names, each at most 63 bytes
    const names = ddl.deferredIndexes.map((x) => partitionIndexName("x".repeat(80), x.name));
    expect(new Set(names).size).toBe(names.length);
    for (const n of names) expect(new TextEncoder().encode(n).length).toBeLessThanOrEqual(63);
  });

  it("creates the non-primary key index pgshift copies by at start (the mirror upserts on it)", () => {
    const f = facts({
      keyColumns: ["email"],
      keyIndexName: "u_email",
      indexes: [
        index("u_email", "btree (email)", ["email"], { isUnique: true }),
        index("i_note", "btree (note)", ["note"]),
      ],
    });
    const out = shadowDdl(f, SPEC, PARTITIONS, { source: TABLE, shadow: SHADOW });
    expect(out.statements.filter((s) => s.includes(" INDEX "))).toEqual([
      `CREATE UNIQUE INDEX "u_email_part" ON ${SHD} USING btree (email, "created_at")`,
    ]);
    expect(out.deferredIndexes.map((d) => d.name)).toEqual(["i_note_part"]);
  });

  it("reports the widened primary key and unique indexes by their original names", () => {
    expect(ddl.widenedUniqueIndexes).toEqual(["Order Items_pkey", "order_items_email_key", "order_items_weird_idx"]);
  });

  it("does not widen a primary key that holds the partition column", () => {
    const f = facts({
      indexes: [index("pk", "btree (id, created_at)", ["id", "created_at"], { isPrimary: true, isUnique: true })],
    });
    const out = shadowDdl(f, SPEC, PARTITIONS, { source: TABLE, shadow: SHADOW });
    expect(out.statements.filter((s) => s.includes("PRIMARY KEY"))).toEqual([
      `ALTER TABLE ${SHD} ADD CONSTRAINT "pk_part" PRIMARY KEY ("id", "created_at")`,
    ]);
    expect(out.widenedUniqueIndexes).toEqual([]);
  });

  it("widens a unique expression index (the expression does not count as the column)", () => {
    const f = facts({ indexes: [index("u_lower", "btree (lower(email))", [null], { isUnique: true })] });
    const out = shadowDdl(f, SPEC, PARTITIONS, { source: TABLE, shadow: SHADOW });
    expect(out.deferredIndexes.map((d) => d.definition)).toEqual([`btree (lower(email), "created_at")`]);
    expect(out.widenedUniqueIndexes).toEqual(["u_lower"]);
  });

  it("adds the foreign keys under their names", () => {
    expect(st.filter((s) => s.includes("FOREIGN KEY"))).toEqual([
      `ALTER TABLE ${SHD} ADD CONSTRAINT "Order Items_order_fkey" FOREIGN KEY ("order") REFERENCES "My ` +
        `Schema"."Orders"(id) ON DELETE CASCADE`,
    ]);
  });

  it("repeats the grants, to roles (quoted) and to PUBLIC, with grant option", () => {
    expect(st.filter((s) => s.startsWith("GRANT"))).toEqual([
      `GRANT SELECT ON ${SHD} TO "Reporting Role"`,
      `GRANT INSERT ON ${SHD} TO "app_writer" WITH GRANT OPTION`,
      `GRANT SELECT ON ${SHD} TO PUBLIC`,
    ]);
  });

  it("emits the statements in dependency order", () => {
    const kinds = st.map((s) =>
      s.includes("OWNER TO")
        ? "owner"
        : s.startsWith("CREATE TABLE") && s.includes("PARTITION OF")
          ? "partition"
          : s.startsWith("CREATE TABLE")
            ? "table"
            : s.includes("SET DEFAULT")
              ? "default"
              : s.startsWith("COMMENT")
                ? "comment"
                : s.includes("PRIMARY KEY")
                  ? "pk"
                  : s.includes("FOREIGN KEY")
                    ? "fk"
                    : s.startsWith("GRANT")
                      ? "grant"
                      : "other",
    );
    expect(kinds).toEqual([
      "table",
      "owner",
      "other",
      "default",
      "comment",
      "partition",
      "owner",
      "partition",
      "owner",
      "partition",
      "owner",
      "pk",
      "fk",
      "grant",
      "grant",
      "grant",
    ]);
    expect(st[2]).toMatch(/^CREATE OR REPLACE FUNCTION "pgshift"\."nextval_/);
  });

  it("quotes every identifier it writes (no bare table, schema, role or odd column names)", () => {
    const stripQuoted = (x: string) => x.replace(/"(?:[^"]|"")*"/g, "<ident>").replace(/'(?:[^']|'')*'/g, "<literal>");
    for (const s of st) {
      const bare = stripQuoted(s);
      expect(bare).not.toMatch(/My Schema|Order Items|Reporting Role|we\(ird|app_writer|created_at"/);
      expect(bare).not.toMatch(/\border\b/i);
      // every statement is about the shadow or one of its partitions, except the identity default's function (which
      // names the sequence)
      if (!s.startsWith("CREATE OR REPLACE FUNCTION"))
        expect(s.includes(SHD) || s.includes(`"My Schema"."Order Items_`)).toBe(true);
    }
    // the reserved word column "order" is quoted wherever pgshift writes it
    const list = shadowDdl(facts(), parsePartitionSpec("list:order"), [], { source: TABLE, shadow: SHADOW });
    expect(list.statements[0]!.endsWith(`PARTITION BY LIST ("order")`)).toBe(true);
    expect(list.statements.filter((s) => s.includes("PRIMARY KEY"))).toEqual([
      `ALTER TABLE ${SHD} ADD CONSTRAINT "Order Items_pkey_part" PRIMARY KEY ("id", "order")`,
    ]);
    expect(list.deferredIndexes.filter((d) => d.unique).map((d) => d.definition)).toEqual([
      `btree (email, "order")`,
      `btree ("we(ird, col" text_pattern_ops, "order") WHERE (note <> 'a)b'::text)`,
      `btree (created_at, "order")`,
    ]);
    expect(list.widenedUniqueIndexes).toEqual(["Order Items_pkey", "order_items_email_key", "order_items_weird_idx"]);
  });
});

describe("shadowDdl: what the partitioned table keeps of the original (issue 13, item 3)", () => {
  const rich = facts({
    rowSecurity: true,
    forceRowSecurity: true,
    replicaIdentity: "f",
    columns: [
      column("id", 1, "int8", { notNull: true }),
      column("created_at", 2, "timestamptz", { notNull: true }),
      column("email", 3, "text", { statisticsTarget: 500, options: ["n_distinct=-0.5", "n_distinct_inherited=40"] }),
    ],
    keyColumns: ["id"],
    keyIndexName: "t_pkey",
    indexes: [
      index("t_pkey", "btree (id)", ["id"], {
        isPrimary: true,
        isUnique: true,
        constraintName: "t_pkey",
        constraintType: "p",
        constraintDef: "PRIMARY KEY (id) INCLUDE (email) WITH (fillfactor='70')",
        comment: "the key",
      }),
      index("t_email_key", "btree (email)", ["email"], {
        isUnique: true,
        constraintName: "t_email_key",
        constraintType: "u",
        constraintDef: "UNIQUE (email) DEFERRABLE INITIALLY DEFERRED",
        deferrable: true,
        deferred: true,
        comment: "ix comment",
        constraintComment: "con comment",
      }),
      index("t_code_key", "btree (email, created_at)", ["email", "created_at"], {
        isUnique: true,
        constraintName: "t_code_key",
        constraintType: "u",
        constraintDef: "UNIQUE (email, created_at) WITH (fillfactor='80')",
        comment: "ix comment",
        constraintComment: "con comment",
      }),
      index("t_note_idx", "btree (email text_pattern_ops)", ["email"], { isClustered: true }),
    ],
    checks: [
      { name: "ok_check", definition: "CHECK ((id > 0))", valid: true, comment: "positive" },
      {
        name: "old_check",
        definition: "CHECK ((email <> ''::text)) NOT VALID",
        valid: false,
        comment: "not for old rows",
      },
      { name: "solo", definition: "CHECK ((id < 100)) NO INHERIT", valid: true, comment: null },
    ],
    foreignKeys: [
      {
        name: "fk_ok",
        definition: "FOREIGN KEY (id) REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED",
        valid: true,
        comment: "fk comment",
      },
      { name: "fk_old", definition: "FOREIGN KEY (id) REFERENCES p(id) NOT VALID", valid: false, comment: null },
    ],
    columnGrants: [{ column: "email", grantee: "Reporting Role", privilege: "UPDATE", grantable: false }],
    statistics: [
      {
        schema: "stats",
        name: "t_st",
        owner: "stat owner",
        kinds: ["d", "f", "m"],
        columns: "id, email",
        target: 300,
        comment: "c",
      },
    ],
    serverVersionNum: 180000,
  });
  const d = shadowDdl(rich, SPEC, PARTITIONS, { source: TABLE, shadow: SHADOW });
  const P1 = `"My Schema"."Order Items_p2024_01"`;

  it("gives the parent and every partition the owner, row security and replica identity", () => {
    for (const rel of [SHD, P1, `"My Schema"."Order Items_default"`]) {
      for (const what of [
        `OWNER TO "app_owner"`,
        "ENABLE ROW LEVEL SECURITY",
        "FORCE ROW LEVEL SECURITY",
        "REPLICA IDENTITY FULL",
      ]) {
        expect(d.statements, `${rel} ${what}`).toContain(`ALTER TABLE ${rel} ${what}`);
      }
    }
  });

  it(
    "adds valid checks now (NO INHERIT dropped), NOT VALID checks and foreign keys after the copy, comments with " +
      "them",
    () => {
      expect(d.statements).toContain(`ALTER TABLE ${SHD} ADD CONSTRAINT "ok_check" CHECK ((id > 0))`);
      expect(d.statements).toContain(`COMMENT ON CONSTRAINT "ok_check" ON ${SHD} IS 'positive'`);
      expect(d.statements).toContain(`ALTER TABLE ${SHD} ADD CONSTRAINT "solo" CHECK ((id < 100))`);
      expect(d.statements.some((s) => s.includes("old_check") || s.includes("fk_old"))).toBe(false);
      expect(d.statements).toContain(
        `ALTER TABLE ${SHD} ADD CONSTRAINT "fk_ok" FOREIGN KEY (id) REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED`,
      );
      expect(d.afterCopy[0]).toBe(
        `DO $pgshift$ BEGIN IF NOT EXISTS (SELECT FROM pg_catalog.pg_constraint WHERE conrelid = '${SHD}'::regclass ` +
          `AND conname = 'old_check') ` +
          `THEN ALTER TABLE ${SHD} ADD CONSTRAINT "old_check" CHECK ((email <> ''::text)) NOT VALID; END IF; END ` +
          `$pgshift$`,
      );
      expect(d.afterCopy).toContain(`COMMENT ON CONSTRAINT "old_check" ON ${SHD} IS 'not for old rows'`);
      expect(
        d.afterCopy.some((s) => s.includes(`ADD CONSTRAINT "fk_old" FOREIGN KEY (id) REFERENCES p(id) NOT VALID`)),
      ).toBe(true);
      // Before 18 a NOT VALID foreign key cannot be put on a partitioned table: refused by plan, never attempted.
      const f17 = { ...rich, serverVersionNum: 170000 };
      expect(afterCopySql(f17, { source: TABLE, shadow: SHADOW }).some((s) => s.includes("fk_old"))).toBe(false);
      expect(fidelityBlockers(f17)).toEqual([
        `foreign key fk_old is NOT VALID, and PostgreSQL before 18 cannot add a NOT VALID foreign key to a ` +
          `partitioned table (ALTER TABLE ... VALIDATE CONSTRAINT "fk_old" first, or drop it)`,
      ]);
      expect(fidelityBlockers(rich)).toEqual([]);
      expect(fidelityWarnings(rich).some((w) => w.includes("check constraint solo is NO INHERIT"))).toBe(true);
    },
  );

  it("keeps statistics targets (recursing) and attribute options (on the parent and each partition)", () => {
    expect(d.statements).toContain(`ALTER TABLE ${SHD} ALTER COLUMN "email" SET STATISTICS 500`);
    for (const rel of [SHD, P1])
      expect(d.statements).toContain(
        `ALTER TABLE ${rel} ALTER COLUMN "email" SET (n_distinct = '-0.5', n_distinct_inherited = '40')`,
      );
  });

  it("creates the primary key from the original's constraint definition, widened, with its comment", () => {
    expect(d.statements).toContain(
      `ALTER TABLE ${SHD} ADD CONSTRAINT "t_pkey_part" PRIMARY KEY (id, "created_at") INCLUDE (email) WITH ` +
        `(fillfactor='70')`,
    );
    expect(d.statements).toContain(`COMMENT ON INDEX "My Schema"."t_pkey_part" IS 'the key'`);
  });

  it("creates a DEFERRABLE unique constraint at once (widened, deferrability kept), with its comments", () => {
    expect(d.statements).toContain(
      `ALTER TABLE ${SHD} ADD CONSTRAINT "t_email_key_part" UNIQUE (email, "created_at") DEFERRABLE INITIALLY DEFERRED`,
    );
    expect(d.statements).toContain(`COMMENT ON INDEX "My Schema"."t_email_key_part" IS 'ix comment'`);
    expect(d.statements).toContain(`COMMENT ON CONSTRAINT "t_email_key_part" ON ${SHD} IS 'con comment'`);
    expect(d.deferredIndexes.some((x) => x.original === "t_email_key")).toBe(false);
    expect(d.indexRenames).toContainEqual({ from: "t_email_key_part", to: "t_email_key" });
  });

  it("builds a (non-deferrable) unique constraint after the copy as a constraint, name kept", () => {
    const u = d.deferredIndexes.find((x) => x.original === "t_code_key")!;
    expect(u.constraint).toEqual({
      definition: `UNIQUE (email, created_at) WITH (fillfactor='80')`,
      deferrable: false,
      deferred: false,
    });
    const sql = deferredIndexSql("My Schema", SHADOW.name, ["Order Items_p2024_01"], u);
    expect(sql.parent).toBe(
      `DO $pgshift$ BEGIN IF to_regclass('"My Schema"."t_code_key_part"') IS NULL THEN ALTER TABLE ONLY ${SHD} ADD ` +
        `CONSTRAINT "t_code_key_part" ` +
        `UNIQUE (email, created_at) WITH (fillfactor='80'); END IF; END $pgshift$`,
    );
    const p = sql.perPartition[0]!;
    expect(p.constrain).toBe(
      `ALTER TABLE ${P1} ADD CONSTRAINT ${quoteIdent(p.index)} UNIQUE USING INDEX ${quoteIdent(p.index)}`,
    );
    const deferrable = deferredIndexSql("My Schema", SHADOW.name, ["Order Items_p2024_01"], {
      ...u,
      constraint: { ...u.constraint!, deferrable: true, deferred: true },
    });
    expect(deferrable.perPartition[0]!.constrain).toMatch(/ DEFERRABLE INITIALLY DEFERRED$/);
    // A plain index has no constraint step.
    const plainIx = d.deferredIndexes.find((x) => x.original === "t_note_idx")!;
    expect(plainIx.constraint).toBeUndefined();
    expect(
      deferredIndexSql("My Schema", SHADOW.name, ["Order Items_p2024_01"], plainIx).perPartition[0]!.constrain,
    ).toBeNull();
    expect(d.afterCopy).toContain(
      `DO $pgshift$ BEGIN IF to_regclass('"My Schema"."t_code_key_part"') IS NOT NULL THEN COMMENT ON INDEX "My ` +
        `Schema"."t_code_key_part" IS 'ix comment'; END IF; END $pgshift$`,
    );
    expect(
      d.afterCopy.some((s) => s.includes(`COMMENT ON CONSTRAINT "t_code_key_part" ON ${SHD} IS 'con comment'`)),
    ).toBe(true);
  });

  it("puts the CLUSTER mark on each partition's index, says so in plan, and analyzes last", () => {
    const cl = d.afterCopy.find((s) => s.includes("CLUSTER ON"))!;
    expect(cl).toContain(
      `WHERE h.inhparent = '"My Schema"."t_note_idx_part"'::regclass LOOP EXECUTE format('ALTER TABLE %I.%I CLUSTER ` +
        `ON %I', r.s, r.t, r.i)`,
    );
    expect(fidelityWarnings(rich).some((w) => w.includes(`clustered on t_note_idx`))).toBe(true);
    expect(d.afterCopy.at(-1)).toBe(`ANALYZE ${SHD}`);
  });

  it("sets REPLICA IDENTITY USING INDEX after the copy, on the parent and each partition", () => {
    const f = {
      ...rich,
      replicaIdentity: "i",
      indexes: rich.indexes.map((i) => (i.name === "t_pkey" ? { ...i, isReplicaIdentity: true } : i)),
    };
    const after = afterCopySql(f, { source: TABLE, shadow: SHADOW });
    const ri = after.find((s) => s.includes("REPLICA IDENTITY USING INDEX"))!;
    expect(ri).toContain(`ALTER TABLE ${SHD} REPLICA IDENTITY USING INDEX "t_pkey_part";`);
    expect(ri).toContain(`EXECUTE format('ALTER TABLE %I.%I REPLICA IDENTITY USING INDEX %I', r.s, r.t, r.i)`);
    expect(
      shadowDdl(f, SPEC, PARTITIONS, { source: TABLE, shadow: SHADOW }).statements.some((s) =>
        s.includes("REPLICA IDENTITY"),
      ),
    ).toBe(false);
  });

  it("creates extended statistics under the shadow's name, with owner, target and comment, and pairs the names", () => {
    expect(d.statements).toContain(
      `CREATE STATISTICS "stats"."t_st_part" (ndistinct, dependencies, mcv) ON id, email FROM ${SHD}`,
    );
    expect(d.statements).toContain(`ALTER STATISTICS "stats"."t_st_part" OWNER TO "stat owner"`);
    expect(d.statements).toContain(`ALTER STATISTICS "stats"."t_st_part" SET STATISTICS 300`);
    expect(d.statements).toContain(`COMMENT ON STATISTICS "stats"."t_st_part" IS 'c'`);
    expect(d.indexRenames).toContainEqual({ from: "t_st_part", to: "t_st" });
    // A single expression takes no kinds.
    const one = shadowDdl(
      { ...rich, statistics: [{ ...rich.statistics[0]!, kinds: ["e"], columns: "(lower(email))" }] },
      SPEC,
      PARTITIONS,
      { source: TABLE, shadow: SHADOW },
    );
    expect(one.statements).toContain(`CREATE STATISTICS "stats"."t_st_part" ON (lower(email)) FROM ${SHD}`);
  });

  it("repeats column grants and the owner's own revokes", () => {
    expect(d.statements).toContain(`GRANT UPDATE ("email") ON ${SHD} TO "Reporting Role"`);
    expect(
      shadowDdl({ ...rich, ownerRevoked: ["DELETE", "TRUNCATE"] }, SPEC, PARTITIONS, { source: TABLE, shadow: SHADOW })
        .statements,
    ).toContain(`REVOKE DELETE, TRUNCATE ON ${SHD} FROM "app_owner"`);
  });

  it("refuses a deferrable key and forced row security the runner would be subject to", () => {
    const f = facts({
      forceRowSecurity: true,
      bypassesRowSecurity: false,
      indexes: [
        index("Order Items_pkey", "btree (id)", ["id"], {
          isPrimary: true,
          isUnique: true,
          constraintName: "Order Items_pkey",
          constraintType: "p",
          deferrable: true,
        }),
      ],
    });
    const b = fidelityBlockers(f);
    expect(b).toHaveLength(2);
    expect(b[0]).toMatch(/^primary key Order Items_pkey is DEFERRABLE/);
    expect(b[1]).toMatch(/^row-level security is forced on "My Schema"\."Order Items"/);
  });

  it("liveNamesSql swaps each pair between the live table and its copy in one re-runnable DO block", () => {
    expect(liveNamesSql(TABLE, SHADOW, [])).toEqual([]);
    const [stmt] = liveNamesSql(TABLE, SHADOW, [
      { from: "a_part", to: "a" },
      { from: "it's_part", to: "it's" },
    ]);
    expect(stmt).toMatch(
      new RegExp(
        String.raw`^DO \$pgshift\$ DECLARE live oid := to_regclass\('"My Schema"\."Order Items"'\); ` +
          String.raw`copy oid := to_regclass\('"My Schema"\."Order Items_pgshift_shadow"'\);`,
      ),
    );
    expect(stmt).toContain(`ARRAY[ARRAY['a_part', 'a'], ARRAY['it''s_part', 'it''s']]::text[]`);
    expect(stmt).toContain("ALTER INDEX %I.%I RENAME TO %I");
    expect(stmt).toContain("ALTER STATISTICS %I.%I RENAME TO %I");
  });
});

describe("mirrorFunctionSql / installTriggerMirrorSql", () => {
  const base: TriggerMirrorSpec = {
    fn: { schema: "pgshift", name: "mirror_16384" },
    from: { schema: "public", name: "orders" },
    to: { schema: "public", name: "orders_pgshift_shadow" },
    columns: ["id", "created_at", "status", "total"],
    key: ["id", "created_at"],
    overridingSystemValue: false,
  };

  it("writes the whole function", () => {
    expect(mirrorFunctionSql(base)).toBe(
      `CREATE OR REPLACE FUNCTION "pgshift"."mirror_16384"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS $pgshift$
#variable_conflict use_column
BEGIN
  IF TG_OP = 'DELETE' THEN
    DELETE FROM "public"."orders_pgshift_shadow" WHERE ("id", "created_at") = (OLD."id", OLD."created_at");
    RETURN NULL;
  END IF;
  IF TG_OP = 'UPDATE' AND (OLD."id", OLD."created_at") IS DISTINCT FROM (NEW."id", NEW."created_at") THEN
    DELETE FROM "public"."orders_pgshift_shadow" WHERE ("id", "created_at") = (OLD."id", OLD."created_at");
  END IF;
  INSERT INTO "public"."orders_pgshift_shadow" ("id", "created_at", "status", "total")
    VALUES (NEW."id", NEW."created_at", NEW."status", NEW."total")
    ON CONFLICT ("id", "created_at") DO UPDATE SET "status" = EXCLUDED."status", "total" = EXCLUDED."total";
  RETURN NULL;
END
$pgshift$`,
    );
  });

  it("upserts on the key and updates only non-key columns", () => {
    const sql = mirrorFunctionSql({ ...base, key: ["id"], columns: ["id", "created_at", "status"] });
    expect(sql).toContain(
      `ON CONFLICT ("id") DO UPDATE SET "created_at" = EXCLUDED."created_at", "status" = EXCLUDED."status";`,
    );
    expect(sql).not.toContain(`"id" = EXCLUDED."id"`);
  });

  it("does nothing on conflict when every column is in the key", () => {
    const sql = mirrorFunctionSql({ ...base, columns: ["id", "created_at"] });
    expect(sql).toContain(`ON CONFLICT ("id", "created_at") DO NOTHING;`);
    expect(sql).not.toContain("DO UPDATE");
  });

  it("adds OVERRIDING SYSTEM VALUE only when asked", () => {
    expect(mirrorFunctionSql(base)).not.toContain("OVERRIDING");
    expect(mirrorFunctionSql({ ...base, overridingSystemValue: true })).toContain(
      `INSERT INTO "public"."orders_pgshift_shadow" ("id", "created_at", "status", "total") OVERRIDING SYSTEM ` +
        `VALUE\n    VALUES (NEW."id"`,
    );
  });

  it("deletes the old row when the key changes, and on DELETE", () => {
    const sql = mirrorFunctionSql({ ...base, key: ["k"], columns: ["k", "v"] });
    const deletes = sql.split("\n").filter((l) => l.includes("DELETE FROM"));
    expect(deletes.map((l) => l.trim())).toEqual([
      `DELETE FROM "public"."orders_pgshift_shadow" WHERE ("k") = (OLD."k");`,
      `DELETE FROM "public"."orders_pgshift_shadow" WHERE ("k") = (OLD."k");`,
    ]);
    expect(sql).toContain(`IF TG_OP = 'UPDATE' AND (OLD."k") IS DISTINCT FROM (NEW."k") THEN`);
  });

  it("quotes odd identifiers everywhere", () => {
    const sql = mirrorFunctionSql({
      fn: { schema: "pg shift", name: 'mir"ror' },
      from: { schema: "My Schema", name: "Order Items" },
      to: { schema: "My Schema", name: "Order Items_pgshift_shadow" },
      columns: ["Id", "order", 'a"b', "x, y"],
      key: ["Id", "order"],
      overridingSystemValue: false,
    });
    expect(sql.startsWith(`CREATE OR REPLACE FUNCTION "pg shift"."mir""ror"() RETURNS trigger`)).toBe(true);
    expect(sql).toContain(
      `DELETE FROM "My Schema"."Order Items_pgshift_shadow" WHERE ("Id", "order") = (OLD."Id", OLD."order");`,
    );
    expect(sql).toContain(`INSERT INTO "My Schema"."Order Items_pgshift_shadow" ("Id", "order", "a""b", "x, y")`);
    expect(sql).toContain(`VALUES (NEW."Id", NEW."order", NEW."a""b", NEW."x, y")`);
    expect(sql).toContain(
      `ON CONFLICT ("Id", "order") DO UPDATE SET "a""b" = EXCLUDED."a""b", "x, y" = EXCLUDED."x, y";`,
    );
  });

  it("picks a dollar-quote tag that does not occur in the body", () => {
    const one = mirrorFunctionSql({ ...base, columns: ["id", "created_at", "$pgshift$"] });
    expect(one).toMatch(/ AS \$pgshift1\$\n#variable_conflict use_column\nBEGIN/);
    expect(one.endsWith("END\n$pgshift1$")).toBe(true);
    expect(one).toContain(`"$pgshift$" = EXCLUDED."$pgshift$"`);
    // the body between the tags never contains the tag
    const body = one.slice(one.indexOf("$pgshift1$") + "$pgshift1$".length, one.lastIndexOf("$pgshift1$"));
    expect(body).not.toContain("$pgshift1$");

    const two = mirrorFunctionSql({ ...base, columns: ["id", "created_at", "$pgshift$", "x$pgshift1$y"] });
    expect(two).toMatch(/ AS \$pgshift2\$\n#variable_conflict use_column\nBEGIN/);
    expect(two.endsWith("END\n$pgshift2$")).toBe(true);

    expect(mirrorFunctionSql({ ...base, columns: ["id", "created_at", "pgshift"] })).toMatch(
      / AS \$pgshift\$\n#variable_conflict use_column\nBEGIN/,
    );
  });

  // BUG: the body refers to key columns unqualified (ON CONFLICT (...), WHERE (...) = (OLD...)). In PL/pgSQL a column
  // named like a built-in variable (found, new, old, tg_op, tg_name, ...) is then ambiguous and, with the default
  // plpgsql.variable_conflict = error, every INSERT into the source fails: `column reference "found" is ambiguous`
  // (checked against PostgreSQL 17). `#variable_conflict use_column` at the start of the body fixes it.
  it("resolves key columns named like PL/pgSQL variables (found, new, tg_op) to the columns", () => {
    const sql = mirrorFunctionSql({ ...base, columns: ["found", "v"], key: ["found"] });
    expect(sql).toMatch(/ AS \$pgshift\$\n#variable_conflict use_column\n/);
  });

  it("installs the function, the row trigger and the TRUNCATE guard", () => {
    const spec: TriggerMirrorSpec = {
      ...base,
      from: { schema: "My Schema", name: "Order Items" },
      fn: { schema: "pgshift", name: "mirror_1" },
    };
    const sql = installTriggerMirrorSql(spec);
    expect(sql).toHaveLength(4);
    expect(sql[0]).toBe(mirrorFunctionSql(spec));
    expect(sql[1]).toBe(
      `CREATE TRIGGER ${MIRROR_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON "My Schema"."Order Items" FOR EACH ROW ` +
        `EXECUTE FUNCTION "pgshift"."mirror_1"()`,
    );
    expect(sql[2]).toBe(
      `CREATE OR REPLACE TRIGGER ${TRUNCATE_TRIGGER} BEFORE TRUNCATE ON "My Schema"."Order Items" FOR EACH STATEMENT ` +
        `EXECUTE FUNCTION "pgshift"."truncate_guard"()`,
    );
    // and on every partition that lacks it, at every level, should the table be partitioned (TRUNCATE of one
    // partition fires only its triggers)
    expect(sql[3]).toContain(
      `pg_catalog.pg_partition_tree('"My Schema"."Order Items"'::regclass) WHERE level > 0 AND NOT EXISTS`,
    );
    expect(sql[3]).toContain(`g.tgname = 'pgshift_truncate_guard'`);
    expect(sql[3]).toContain(
      `EXECUTE format('CREATE TRIGGER pgshift_truncate_guard BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE ` +
        `FUNCTION "pgshift"."truncate_guard"()', part)`,
    );
    expect(MIRROR_TRIGGER).toBe("pgshift_mirror");
    expect(TRUNCATE_TRIGGER).toBe("pgshift_truncate_guard");
  });

  it("stops the mirror without the TRUNCATE guard, which is removed on its own", () => {
    const t = { schema: "My Schema", name: "Order Items" };
    expect(removeMirrorTriggerSql(t)).toEqual([`DROP TRIGGER IF EXISTS pgshift_mirror ON "My Schema"."Order Items"`]);
    expect(removeTruncateGuardSql(t)).toEqual([
      `DROP TRIGGER IF EXISTS pgshift_truncate_guard ON "My Schema"."Order Items"`,
      expect.stringContaining(`EXECUTE format('DROP TRIGGER IF EXISTS pgshift_truncate_guard ON %s', part)`),
    ]);
  });
});
