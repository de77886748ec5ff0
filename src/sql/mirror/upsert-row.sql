-- The forward mirror's upsert of the new row (upsert.sql, route.sql). Placeholders: :"to" the table written;
-- :"columns" the columns written; :new_values NEW.c, ... for the columns; :overriding nothing or " OVERRIDING SYSTEM
-- VALUE"; :"key" the target's key; :conflict DO NOTHING or DO UPDATE SET c = EXCLUDED.c, ...
INSERT INTO :"to" (:"columns"):overriding
    VALUES (:new_values)
    ON CONFLICT (:"key") :conflict;
