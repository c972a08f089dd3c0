-- asyncjobs schema, version 17 (PostgreSQL): a claim from some queues reads their jobs,
-- not every queue's.
--
-- A worker serving some queues (Jobs(queues=[...])) walked the ready jobs of no group
-- in claim order (asyncjobs_jobs_ready_plain) and tested each one's queue: behind a
-- backlog of 100,000 jobs in another queue, a claim of 100 read 101,000 rows (12,000
-- pages) whether the table was analysed or not. It now reads each of its queues' next
-- job through this index, a seek a queue a step, and takes the first of them. Each
-- insert and finish of a job of no group writes one more index entry (1-2 µs).
--
-- CREATE INDEX (not CONCURRENTLY: migrations run in a transaction) blocks writes to the
-- job table while it builds, a moment for a table of a few million rows.
CREATE INDEX asyncjobs_jobs_ready_queue ON asyncjobs_jobs (queue, priority DESC, seq)
    WHERE status = 'queued' AND group_key IS NULL;
