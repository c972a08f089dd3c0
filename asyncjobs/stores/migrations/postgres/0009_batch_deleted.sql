-- asyncjobs schema, version 9 (PostgreSQL): the members a batch lost to deletion.
--
-- A batch's counts come from its member rows. A member discarded or purged (or pruned)
-- dropped out of them: the on_complete got the counts of a smaller batch, and the
-- batch's progress never read finished. Each deletion now adds what it took, by
-- batch and status, to this tally, which the counts add back. Once no job of its
-- batch is left, retention prunes a tally as it would the members it counts:
-- finished_at is the latest finish among them.
CREATE TABLE asyncjobs_batch_deleted (
    batch_id    text             NOT NULL,
    status      text             NOT NULL,
    n           bigint           NOT NULL,
    finished_at double precision NOT NULL,
    PRIMARY KEY (batch_id, status)
);
