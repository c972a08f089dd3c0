-- asyncjobs schema, version 9 (PostgreSQL): the members a batch lost to deletion.
--
-- A batch's counts come from its member rows. A member discarded or purged (or pruned)
-- dropped out of them: the on_complete got the counts of a smaller batch, and the
-- batch's progress never read finished. Each deletion now adds what it took, by
-- batch and status, to this tally, which the counts add back. A tally lives as long
-- as a row of its batch (a member, or the on_complete whose id is the batch id).
CREATE TABLE asyncjobs_batch_deleted (
    batch_id text   NOT NULL,
    status   text   NOT NULL,
    n        bigint NOT NULL,
    PRIMARY KEY (batch_id, status)
);
