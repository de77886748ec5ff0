-- The forward mirror's delete of the old row (upsert.sql, route.sql). Placeholders: :"to" the table written; :"key"
-- the target's key; :old_key the key as (OLD.k, ...).
DELETE FROM :"to" WHERE (:"key") = :old_key;
