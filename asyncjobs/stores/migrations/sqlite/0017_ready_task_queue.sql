-- asyncjobs schema, version 17 (SQLite): a claim under limits from some queues reads
-- their jobs, not every queue's.
--
-- A claim under a concurrency or rate limit walks each task's first ready jobs in
-- claim order (_sqlite_limits). A worker serving some queues (Jobs(queues=[...])) walked
-- them through asyncjobs_jobs_ready_task and tested each one's queue: behind 20,000
-- jobs of the task in another queue, a claim of 100 took 214,000 VM steps (34,000
-- alone). It now walks each of its queues' jobs of the task through this index and
-- merges them in claim order. Each insert, claim and finish of a ready job writes one
-- more index entry.
CREATE INDEX asyncjobs_jobs_ready_task_queue ON asyncjobs_jobs (task, queue, priority DESC, seq)
    WHERE status = 'queued' AND behind IS NULL;
