-- asyncjobs schema, version 4 (PostgreSQL): a NOTIFY channel within PostgreSQL's limit of
-- 63 bytes for every schema name. Version 1 cut 'asyncjobs:' || schema to 63 characters,
-- which a long non-ASCII name (26 Cyrillic letters and more) takes past 63 bytes: then
-- pg_notify raised, and every insert failed. The channel stays the same whenever it
-- fits (always for ASCII names); otherwise it is 'asyncjobs:' and the name's md5.
-- _postgres_sql.CHANNEL computes the same for the listeners.
CREATE OR REPLACE FUNCTION asyncjobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        CASE WHEN octet_length(left('asyncjobs:' || TG_TABLE_SCHEMA, 63)) <= 63
             THEN left('asyncjobs:' || TG_TABLE_SCHEMA, 63)
             ELSE 'asyncjobs:' || md5(TG_TABLE_SCHEMA) END,
        '');
    RETURN NULL;
END
$$;
