-- asyncjobs schema, version 14 (PostgreSQL): claims read a group's head, not its backlog.
--
-- A group runs one job at a time, so of its queued jobs only the first can be claimed.
-- A claim walked the ready jobs in claim order and tested each against its group: a
-- group of 20,000 queued jobs was read whole by every claim (170 ms). The ready jobs of
-- no group and those of a group now have an index each (a ready job is in one of them,
-- as it was in asyncjobs_jobs_ready, which they replace): a claim reads the first of the
-- first, and a window of the second's, and only when that window holds too few heads
-- does it read each group's first job instead (asyncjobs_jobs_group), one seek a group.
-- asyncjobs_jobs_group_busy finds a group's running job in one seek too: the test
-- through asyncjobs_jobs_group read every unfinished job of the group to find none.
--
-- CREATE INDEX (not CONCURRENTLY: migrations run in a transaction) blocks writes to the
-- job table while it builds, a moment for a table of a few million rows.
CREATE INDEX asyncjobs_jobs_ready_plain ON asyncjobs_jobs (priority DESC, seq)
    WHERE status = 'queued' AND group_key IS NULL;
CREATE INDEX asyncjobs_jobs_ready_grouped ON asyncjobs_jobs (priority DESC, seq)
    WHERE status = 'queued' AND group_key IS NOT NULL;
CREATE INDEX asyncjobs_jobs_group_busy ON asyncjobs_jobs (group_key)
    WHERE group_key IS NOT NULL AND status = 'running';
DROP INDEX asyncjobs_jobs_ready;
