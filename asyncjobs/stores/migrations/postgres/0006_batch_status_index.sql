-- asyncjobs schema, version 6 (PostgreSQL): a batch's members by status.
--
-- Each member that finishes asks whether any other member is unfinished. Counting
-- every member for it made a batch of n jobs cost n^2 row reads. With the status in
-- the key the question is a seek per unfinished status.
DROP INDEX asyncjobs_jobs_batch;
CREATE INDEX asyncjobs_jobs_batch ON asyncjobs_jobs (batch_id, status) WHERE batch_id IS NOT NULL;
