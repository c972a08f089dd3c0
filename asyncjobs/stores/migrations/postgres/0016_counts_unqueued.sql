-- asyncjobs schema, version 16 (PostgreSQL): the counts index holds no queued job.
--
-- On a table never analysed, a claim's step to the next queued job (ORDER BY priority
-- DESC, seq LIMIT 1) read every queued job through asyncjobs_jobs_counts and sorted
-- them: its queued jobs of one task and queue are one deduplicated key, a page for up
-- to about 1,300 of them, which looked cheaper than asyncjobs_jobs_ready_plain (a claim
-- of 100 from 1,000 fresh jobs read 100,000 index entries). The counts index serves the
-- operations snapshot's count of the jobs neither scheduled nor queued (those it
-- counts from the rows, with their run_at), so it now holds only those: no claim can
-- read the queued jobs through it, and an enqueue writes one index entry fewer.
--
-- CREATE INDEX (not CONCURRENTLY: migrations run in a transaction) blocks writes to the
-- job table while it builds, a moment for a table of a few million rows.
DROP INDEX asyncjobs_jobs_counts;
CREATE INDEX asyncjobs_jobs_counts ON asyncjobs_jobs (status, queue, task)
    WHERE status NOT IN ('scheduled', 'queued');
