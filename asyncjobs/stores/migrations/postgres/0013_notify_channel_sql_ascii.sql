-- asyncjobs schema, version 13 (PostgreSQL): a NOTIFY channel that can be read back in a
-- SQL_ASCII database. There PostgreSQL counts bytes as characters, so version 4's cut
-- to 63 characters of a long non-ASCII schema name could end inside a UTF-8 character:
-- the store, reading the channel to LISTEN on, failed to open ('invalid byte sequence
-- for encoding "UTF8"'). Such a name now gets the md5 channel; every other channel stays
-- as it was. _postgres_sql.CHANNEL computes the same for the listeners.
CREATE OR REPLACE FUNCTION asyncjobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        CASE WHEN octet_length(left('asyncjobs:' || TG_TABLE_SCHEMA, 63)) <= 63
                  AND NOT (getdatabaseencoding() = 'SQL_ASCII'
                           AND substring(convert_to('asyncjobs:' || TG_TABLE_SCHEMA, 'SQL_ASCII')
                                         FROM 64 FOR 1)
                               BETWEEN '\x80'::bytea AND '\xbf'::bytea)
             THEN left('asyncjobs:' || TG_TABLE_SCHEMA, 63)
             ELSE 'asyncjobs:' || md5(TG_TABLE_SCHEMA) END,
        '');
    RETURN NULL;
END
$$;
