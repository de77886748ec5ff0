-- Replaces the forward mirror's trigger function (upsert.sql) by one that writes each row straight into its leaf
-- partition of the target (routedMirrorFunctionSql in src/mirror/trigger.ts). Placeholders: :'to' the target (a
-- table name as a literal); :'function' the function as a format() pattern whose %1$s is the declarations, %2$s the
-- delete of the old row, %3$s the upsert of the new one; :'delete' and :'upsert' those statements as format()
-- patterns whose %s is the table written; :'parent_delete' and :'parent_upsert' them on the target itself; :tag the
-- dollar quote, absent from the body.
-- The leaves are found in the catalog, each with its partition constraint as PostgreSQL states it
-- (pg_get_partition_constraintdef: the constraint of every level above it included), which names the partition
-- columns: the function declares a variable of each such column (its type and collation), sets them from OLD or
-- NEW, and tries the constraints in turn. A row that meets none (a DEFAULT partition's row, a NULL) is written into
-- the target itself, routed by PostgreSQL. Leaves under a DEFAULT partition are left to the target too. Nothing is
-- routed (the function stays as upsert.sql wrote it, through the target) when the target is not partitioned, a
-- partition key is an expression, or a partition column is named like a variable of PL/pgSQL's trigger functions.
DO :tag
DECLARE
  target regclass := :'to'::regclass;
  cols text[];
  decls text := '';
  set_old text := '';
  set_new text := '';
  del text := '';
  ins text := '';
  r record;
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_partitioned_table WHERE partrelid = target) THEN
    RETURN;
  END IF;
  IF EXISTS (SELECT FROM pg_catalog.pg_partition_tree(target) AS t
               JOIN pg_catalog.pg_partitioned_table AS p ON p.partrelid = t.relid
              WHERE 0 = ANY (p.partattrs::int2[])) THEN
    RETURN;
  END IF;
  SELECT array_agg(DISTINCT a.attname::text) INTO cols
    FROM pg_catalog.pg_partition_tree(target) AS t
    JOIN pg_catalog.pg_partitioned_table AS p ON p.partrelid = t.relid
    CROSS JOIN LATERAL unnest(p.partattrs::int2[]) AS k(attnum)
    JOIN pg_catalog.pg_attribute AS a ON a.attrelid = t.relid AND a.attnum = k.attnum;
  IF EXISTS (SELECT FROM unnest(cols) AS c(name) WHERE lower(c.name) IN ('new', 'old', 'found') OR lower(c.name)
             LIKE 'tg\_%') THEN
    RETURN;
  END IF;
  FOR r IN
    SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type,
           (SELECT format(' COLLATE %I.%I', n.nspname, l.collname) FROM pg_catalog.pg_collation AS l
              JOIN pg_catalog.pg_namespace AS n ON n.oid = l.collnamespace WHERE l.oid = a.attcollation) AS coll
      FROM pg_catalog.pg_attribute AS a
     WHERE a.attrelid = target AND a.attname::text = ANY (cols) AND NOT a.attisdropped
     ORDER BY a.attnum
  LOOP
    decls := decls || format(E'  %I %s%s;\n', r.attname, r.type, coalesce(r.coll, ''));
    set_old := set_old || format(E'    %I := OLD.%I;\n', r.attname, r.attname);
    set_new := set_new || format(E'  %I := NEW.%I;\n', r.attname, r.attname);
  END LOOP;
  FOR r IN
    SELECT format('%I.%I', n.nspname, c.relname) AS leaf, pg_catalog.pg_get_partition_constraintdef(t.relid) AS cond
      FROM pg_catalog.pg_partition_tree(target) AS t
      JOIN pg_catalog.pg_class AS c ON c.oid = t.relid
      JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
     WHERE t.isleaf AND t.level > 0
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_partition_ancestors(t.relid) AS u
                         JOIN pg_catalog.pg_class AS uc ON uc.oid = u.relid
                        WHERE pg_catalog.pg_get_expr(uc.relpartbound, uc.oid) = 'DEFAULT')
     -- most recent range first when the bounds are times or numbers written alike (only the speed depends on it)
     ORDER BY pg_catalog.pg_get_expr(c.relpartbound, c.oid) DESC
  LOOP
    del := del || format(E'    %s %s THEN\n      %s\n', CASE WHEN del = '' THEN 'IF' ELSE 'ELSIF' END, r.cond,
                         format(:'delete', r.leaf));
    ins := ins || format(E'  %s %s THEN\n    %s\n', CASE WHEN ins = '' THEN 'IF' ELSE 'ELSIF' END, r.cond,
                         format(:'upsert', r.leaf));
  END LOOP;
  IF del = '' THEN
    RETURN;
  END IF;
  del := set_old || del || E'    ELSE\n      ' || :'parent_delete' || E'\n    END IF;';
  ins := set_new || ins || E'  ELSE\n    ' || :'parent_upsert' || E'\n  END IF;';
  EXECUTE format(:'function', E'DECLARE\n' || decls, del, ins);
END
:tag
