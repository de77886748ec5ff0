import { describe, expect, it } from "vitest";
import { GroupNameSchema, referencedFirst } from "../../src/group/members.js";
import { lockOrder } from "../../src/group/switch.js";

const t = (name: string) => ({ schema: "public", name });
const id = <T>(x: T) => x;

describe("migration groups: the order of the tables", () => {
  it("puts a referenced table before the tables that reference it, otherwise keeps the order given", () => {
    const fks = [
      { name: "items_order", from: t("order_items"), to: t("orders") },
      { name: "ship_item", from: t("shipments"), to: t("order_items") },
    ];
    const order = referencedFirst([t("shipments"), t("order_items"), t("notes"), t("orders")], id, fks);
    expect(order.map((x) => x.name)).toEqual(["notes", "orders", "order_items", "shipments"]);
  });

  it("refuses a cycle of foreign keys", () => {
    const fks = [
      { name: "a_b", from: t("a"), to: t("b") },
      { name: "b_a", from: t("b"), to: t("a") },
    ];
    expect(() => referencedFirst([t("a"), t("b")], id, fks)).toThrow(/form a cycle/);
  });

  it("locks each table's live table, then its copy, in the group's order", () => {
    const m = (name: string) => ({ live: t(name), copy: t(`${name}_pgshift_shadow`) });
    expect(lockOrder([m("orders"), m("order_items")]).map((x) => x.name)).toEqual([
      "orders",
      "orders_pgshift_shadow",
      "order_items",
      "order_items_pgshift_shadow",
    ]);
  });

  it("accepts a group name of letters, digits, _ . -, and nothing else", () => {
    expect(GroupNameSchema.safeParse("shop_2026.q1-a").success).toBe(true);
    for (const bad of ["", "-x", "a b", "a;b", "x".repeat(64)])
      expect(GroupNameSchema.safeParse(bad).success).toBe(false);
  });
});
