-- asyncjobs schema, version 18 (PostgreSQL): the finished index leads with the status.
--
-- Dead jobs are kept longer than succeeded and cancelled ones (dead_retention), so
-- every prune batch of those walked asyncjobs_jobs_finished from the oldest past every
-- dead job still kept: 100,000 of them were 100,000 rows removed by filter, every
-- minute in every process, even with nothing to prune. By (status, finished_at), each
-- status is its own range, walked up to its own retention. As many entries per job.
-- The operations snapshot reads its windows and samples per status too. A purge by age
-- alone (no status) no longer seeks its jobs here once analysed: it reads the table, as
-- one of dead jobs (status NOT IN ...) or one on a table never analysed already did.
--
-- CREATE INDEX (not CONCURRENTLY: migrations run in a transaction) blocks writes to the
-- job table while it builds, a moment for a table of a few million rows.
DROP INDEX asyncjobs_jobs_finished;
CREATE INDEX asyncjobs_jobs_finished ON asyncjobs_jobs (status, finished_at)
    WHERE finished_at IS NOT NULL;
