-- asyncjobs schema, version 15 (SQLite): the finished index leads with the status.
--
-- Dead jobs are kept longer than succeeded and cancelled ones (dead_retention), so
-- every prune batch of those walked asyncjobs_jobs_finished from the oldest past every
-- dead job still kept: 100,000 of them cost a batch 600,000 VM steps, every minute in
-- every process, even with nothing to prune. By (status, finished_at), each status is
-- its own range, walked up to its own retention. As many entries per job as before.
DROP INDEX asyncjobs_jobs_finished;
CREATE INDEX asyncjobs_jobs_finished ON asyncjobs_jobs (status, finished_at)
    WHERE finished_at IS NOT NULL;
