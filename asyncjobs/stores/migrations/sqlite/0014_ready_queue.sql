-- asyncjobs schema, version 14 (SQLite): a claim from some queues reads their jobs, not
-- every queue's.
--
-- A worker serving some queues (Jobs(queues=[...])) walked the ready jobs in claim
-- order (asyncjobs_jobs_ready) and tested each one's queue: behind 100,000 jobs in
-- another queue, a claim of 100 took 1,400,000 VM steps (27,000 alone). It now reads
-- the first jobs of each of its queues through this index and takes the first of them.
-- Each insert and finish writes one more index entry.
CREATE INDEX asyncjobs_jobs_ready_queue ON asyncjobs_jobs (queue, priority DESC, seq)
    WHERE status = 'queued' AND behind IS NULL;
