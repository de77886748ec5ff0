-- The DDL guard's function (ddlGuardSql in src/migration/ddl-guard.ts says what it refuses and why), run by
-- three event triggers (ddl-guard-triggers.sql). Placeholders: :"fn" the function; :partitioned and :copy the
-- names of the partitioned table and of the copy over a row of pgshift.migrations in its phase (namesInSql,
-- src/migration/phases.ts); :'allow_ddl' the setting that lets a change through; :'partitions' the session
-- setting that carries the partitions from ddl_command_start to the same command's ddl_command_end or sql_drop;
-- :'truncate_trigger' and :'truncate_guard_fn' the TRUNCATE guard; :'hint' and :'columns_hint' the hints.
CREATE OR REPLACE FUNCTION :"fn"() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $pgshift$
DECLARE
  allowed boolean;
  snapshot text;
  altered oid;
  m record;
  live regclass;
  copy regclass;
  changed text;
  part regclass;
  has_rows boolean;
BEGIN
  IF to_regclass('pgshift.migrations') IS NULL THEN
    RETURN;
  END IF;
  allowed := coalesce(current_setting(:'allow_ddl', true), '') = 'on';
  IF TG_EVENT = 'ddl_command_start' THEN
    -- The partitions of each partitioned table under migration (the shadow before cutover, the live table
    -- after), as pairs of root oid and member oid, the root included. Kept for the session, not the transaction:
    -- DETACH PARTITION ... CONCURRENTLY ends in another transaction than the one it starts in.
    SELECT coalesce(string_agg(format('%s:%s', r.root::oid, t.relid::oid), ','), '') INTO snapshot
      FROM (SELECT to_regclass(format('%I.%I', source_schema, :partitioned)) AS root
              FROM pgshift.migrations) AS r
      CROSS JOIN LATERAL pg_partition_tree(r.root) AS t
     WHERE r.root IS NOT NULL;
    PERFORM set_config(:'partitions', snapshot, false);
    -- A concurrent detach commits its first transaction before ddl_command_end: refused there, it would leave
    -- the partition detach-pending (its rows already gone from the table). Refused here instead, when the
    -- statement names a partitioned table under migration.
    IF TG_TAG = 'ALTER TABLE' AND NOT allowed
       AND current_query() ~* 'detach[[:space:]]+partition.*concurrently' THEN
      FOR m IN SELECT :partitioned AS parted, source_schema, source_table
                 FROM pgshift.migrations LOOP
        IF strpos(lower(current_query()), lower(m.parted)) > 0 THEN
          RAISE EXCEPTION 'pgshift: DETACH PARTITION CONCURRENTLY refused while % is being migrated: '
                          'the statement names %, whose partitions hold the rows of the migration',
              format('%I.%I', m.source_schema, m.source_table), format('%I.%I', m.source_schema, m.parted)
            USING ERRCODE = 'object_in_use', HINT = :'hint';
        END IF;
      END LOOP;
    END IF;
    RETURN;
  END IF;
  -- Both tables of a migration carry the TRUNCATE guard, and TRUNCATE of one partition fires only that
  -- partition's triggers: a partition this command created or attached (in the shadow, or in the live table
  -- after cutover) gets the guard too. Only those: this runs for every CREATE and ALTER TABLE in the
  -- database, and must not lock other tables (the command already holds the new partition's lock).
  IF TG_EVENT = 'ddl_command_end' AND TG_TAG = 'CREATE TABLE' THEN
    FOR part IN SELECT t.relid
                  FROM (SELECT to_regclass(format('%I.%I', source_schema, :partitioned)) AS root
                          FROM pgshift.migrations) AS r
                  CROSS JOIN LATERAL pg_partition_tree(r.root) AS t
                 WHERE r.root IS NOT NULL AND t.level > 0
                   AND t.relid::oid IN (SELECT c.objid FROM pg_event_trigger_ddl_commands() AS c
                                         WHERE c.classid = 'pg_catalog.pg_class'::regclass)
                   AND NOT EXISTS (SELECT FROM pg_trigger AS g
                                    WHERE g.tgrelid = t.relid AND g.tgname = :'truncate_trigger') LOOP
      EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                     :'truncate_trigger', part, :'truncate_guard_fn');
    END LOOP;
    RETURN;
  END IF;
  snapshot := coalesce(current_setting(:'partitions', true), '');
  IF snapshot <> '' THEN
    PERFORM set_config(:'partitions', '', false);
  END IF;
  IF TG_EVENT = 'ddl_command_end' THEN
    -- ALTER TABLE: the members that were not there at ddl_command_start (ATTACH PARTITION).
    FOR part IN SELECT t.relid
                  FROM (SELECT DISTINCT split_part(pair, ':', 1)::oid::regclass AS root
                          FROM unnest(string_to_array(snapshot, ',')) AS pair) AS r
                  CROSS JOIN LATERAL pg_partition_tree(r.root) AS t
                 WHERE t.level > 0
                   AND t.relid::oid::text <> ALL (SELECT split_part(pair, ':', 2)
                                                    FROM unnest(string_to_array(snapshot, ',')) AS pair)
                   AND NOT EXISTS (SELECT FROM pg_trigger AS g
                                    WHERE g.tgrelid = t.relid AND g.tgname = :'truncate_trigger') LOOP
      EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                     :'truncate_trigger', part, :'truncate_guard_fn');
    END LOOP;
  END IF;
  IF allowed THEN
    -- Let through. A partition detached this way leaves the migration, and its TRUNCATE guard with it.
    IF TG_EVENT = 'ddl_command_end' THEN
      FOR part IN SELECT split_part(s.pair, ':', 2)::oid::regclass
                    FROM unnest(string_to_array(snapshot, ',')) AS s(pair)
                   WHERE EXISTS (SELECT FROM pg_trigger AS g
                                  WHERE g.tgrelid = split_part(s.pair, ':', 2)::oid AND g.tgname = :'truncate_trigger')
                     AND NOT EXISTS (SELECT FROM pg_partition_tree(split_part(s.pair, ':', 1)::oid::regclass) AS t
                                      WHERE t.relid::oid = split_part(s.pair, ':', 2)::oid) LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', :'truncate_trigger', part);
      END LOOP;
    END IF;
    RETURN;
  END IF;
  IF TG_EVENT = 'sql_drop' THEN
    FOR m IN SELECT source_schema, source_table, :copy AS copy_table
               FROM pgshift.migrations LOOP
      SELECT string_agg(format('%I.%I', d.schema_name, d.object_name), ', ' ORDER BY d.object_name) INTO changed
        FROM pg_event_trigger_dropped_objects() AS d
       WHERE d.object_type = 'table' AND d.schema_name = m.source_schema
         AND d.object_name IN (m.source_table, m.copy_table);
      IF changed IS NOT NULL THEN
        RAISE EXCEPTION 'pgshift: DROP refused while % is being migrated: it would drop %',
            format('%I.%I', m.source_schema, m.source_table), changed
          USING ERRCODE = 'object_in_use', HINT = :'hint';
      END IF;
    END LOOP;
    -- A partition of a partitioned table under migration (its oid is gone from the catalog by now: the
    -- snapshot of ddl_command_start knows it).
    SELECT string_agg(format('%I.%I (a partition of %s)', d.schema_name, d.object_name,
                             split_part(s.pair, ':', 1)::oid::regclass), ', ' ORDER BY d.object_name) INTO changed
      FROM pg_event_trigger_dropped_objects() AS d
      JOIN unnest(string_to_array(snapshot, ',')) AS s(pair) ON split_part(s.pair, ':', 2)::oid = d.objid
     WHERE d.object_type = 'table' AND split_part(s.pair, ':', 1) <> split_part(s.pair, ':', 2);
    IF changed IS NOT NULL THEN
      RAISE EXCEPTION 'pgshift: DROP refused while a table is being migrated: '
                      'it would drop %, and the rows in it with it', changed
        USING ERRCODE = 'object_in_use', HINT = :'hint';
    END IF;
    RETURN;
  END IF;
  -- ddl_command_end of ALTER TABLE. Partitions: none detached, none attached with rows in it.
  SELECT string_agg(format('%s (from %s)', split_part(s.pair, ':', 2)::oid::regclass,
                           split_part(s.pair, ':', 1)::oid::regclass), ', ') INTO changed
    FROM unnest(string_to_array(snapshot, ',')) AS s(pair)
   WHERE NOT EXISTS (SELECT FROM pg_partition_tree(split_part(s.pair, ':', 1)::oid::regclass) AS t
                      WHERE t.relid::oid = split_part(s.pair, ':', 2)::oid);
  IF changed IS NOT NULL THEN
    RAISE EXCEPTION 'pgshift: ALTER TABLE refused while a table is being migrated: '
                    'it would detach %, and the rows in it with it', changed
      USING ERRCODE = 'object_in_use', HINT = :'hint';
  END IF;
  FOR part IN SELECT t.relid
                FROM (SELECT DISTINCT split_part(pair, ':', 1)::oid::regclass AS root
                        FROM unnest(string_to_array(snapshot, ',')) AS pair) AS r
                CROSS JOIN LATERAL pg_partition_tree(r.root) AS t
                JOIN pg_class AS c ON c.oid = t.relid
               WHERE t.level > 0 AND c.relkind = 'r'
                 AND t.relid::oid::text <> ALL (SELECT split_part(pair, ':', 2)
                                                  FROM unnest(string_to_array(snapshot, ',')) AS pair) LOOP
    EXECUTE format('SELECT EXISTS (SELECT FROM ONLY %s)', part) INTO has_rows;
    IF has_rows THEN
      RAISE EXCEPTION 'pgshift: ALTER TABLE refused while a table is being migrated: it would attach %, '
                      'which holds rows the other table of the migration does not have, to %',
          part, (SELECT inhparent::regclass FROM pg_inherits WHERE inhrelid = part)
        USING ERRCODE = 'object_in_use', HINT = :'hint';
    END IF;
  END LOOP;
  -- Columns.
  FOR altered IN SELECT DISTINCT objid FROM pg_event_trigger_ddl_commands()
                  WHERE classid = 'pg_catalog.pg_class'::regclass LOOP
    FOR m IN SELECT source_schema, source_table, :copy AS copy_table, copy_columns
               FROM pgshift.migrations LOOP
      live := to_regclass(format('%I.%I', m.source_schema, m.source_table));
      copy := to_regclass(format('%I.%I', m.source_schema, m.copy_table));
      CONTINUE WHEN live IS NULL OR copy IS NULL OR altered NOT IN (live::oid, copy::oid);
      WITH l AS (SELECT attname::text AS n, format_type(atttypid, atttypmod) AS t, attgenerated::text AS g
                   FROM pg_attribute WHERE attrelid = live AND attnum > 0 AND NOT attisdropped),
           c AS (SELECT attname::text AS n, format_type(atttypid, atttypmod) AS t, attgenerated::text AS g
                   FROM pg_attribute WHERE attrelid = copy AND attnum > 0 AND NOT attisdropped)
      SELECT string_agg(DISTINCT n, ', ' ORDER BY n) INTO changed FROM (
        SELECT coalesce(l.n, c.n) AS n FROM l FULL JOIN c ON c.n = l.n
         WHERE l.n IS NULL OR c.n IS NULL OR l.t <> c.t OR l.g <> c.g
        UNION ALL SELECT n FROM l WHERE g = '' AND n <> ALL (m.copy_columns)
        UNION ALL SELECT x FROM unnest(m.copy_columns) AS x WHERE NOT EXISTS (SELECT FROM l WHERE l.n = x)
      ) AS d;
      IF changed IS NOT NULL THEN
        RAISE EXCEPTION 'pgshift: ALTER TABLE refused while % is being migrated: '
                        'the columns of % and % would differ (%)', live, live, copy, changed
          USING ERRCODE = 'object_in_use', HINT = :'columns_hint';
      END IF;
    END LOOP;
  END LOOP;
END
$pgshift$
