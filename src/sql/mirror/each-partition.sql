-- Runs :'command' (a format() pattern with one %s for the partition) on every partition of :'parent' (a table
-- name as a literal), at every level, where :condition (SQL text: " AND " and a condition on relid, or nothing)
-- holds; nothing when the table is not partitioned (forEachPartitionSql in src/mirror/trigger.ts).
DO $pgshift$
DECLARE part regclass;
BEGIN
  FOR part IN SELECT relid FROM pg_catalog.pg_partition_tree(:'parent'::regclass) WHERE level > 0:condition LOOP
    EXECUTE format(:'command', part);
  END LOOP;
END
$pgshift$
