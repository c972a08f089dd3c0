-- asyncjobs schema, version 7 (SQLite): the members a batch lost to deletion.
--
-- A batch's counts come from its member rows. A member discarded or purged (or pruned)
-- dropped out of them: the on_complete got the counts of a smaller batch, and the
-- batch's progress never read finished. Each deletion now adds what it took, by
-- batch and status, to this tally, which the counts add back. Once no job of its
-- batch is left, retention prunes a tally as it would the members it counts:
-- finished_at is the latest finish among them.
CREATE TABLE asyncjobs_batch_deleted (
    batch_id    TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    n           INTEGER NOT NULL,
    finished_at REAL    NOT NULL,
    PRIMARY KEY (batch_id, status)
) WITHOUT ROWID;
