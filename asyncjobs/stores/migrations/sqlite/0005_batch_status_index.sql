-- asyncjobs schema, version 5 (SQLite): a batch's members by status.
--
-- Each member that finishes asks whether any other member is unfinished. Over the
-- index on batch_id alone that read every member, so a batch of n jobs cost n^2 row
-- reads (a batch of 20,000 held each finish for 170 ms). With the status in the key
-- the question is a seek per unfinished status.
DROP INDEX asyncjobs_jobs_batch;
CREATE INDEX asyncjobs_jobs_batch ON asyncjobs_jobs (batch_id, status) WHERE batch_id IS NOT NULL;
