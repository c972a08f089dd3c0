-- asyncjobs schema, version 20 (PostgreSQL): a claim under limits from some queues
-- reads their jobs, not every queue's.
--
-- A claim under a concurrency or rate limit reads each task's next ready jobs in claim
-- order (_postgres_limits._HEADS): its first ones (asyncjobs_jobs_ready_task) and,
-- when a group's backlog fills them, its jobs of no group
-- (asyncjobs_jobs_ready_task_plain). A worker serving some queues (Jobs(queues=[...]))
-- read them there and tested each one's queue: behind 20,000 jobs of the task in another
-- queue, a claim of 100 read 20,200 rows. It now reads each of its queues' jobs of the
-- task through these, the jobs of no group and of groups apart (as the claim reads
-- them), and merges them in claim order. A job is in one of the two: each insert and
-- each claim of a queued job writes one more index entry.
--
-- A plain claim from some queues reads the heads of groups first among the first jobs
-- of groups in claim order (_postgres_claim._TAKE_READY), one seek a job in
-- asyncjobs_jobs_ready_grouped: those of every queue, so a backlog of groups in another
-- queue filled them, and the claim found its queues' heads only on its walk through the
-- groups, 256 a claim in name order (behind 20,000 groups in another queue named before
-- them: none). It now reads its queues' first jobs of groups, a seek a queue a step,
-- through asyncjobs_jobs_ready_queue_grouped. Each insert and claim of a queued job of
-- a group writes one more index entry.
--
-- CREATE INDEX (not CONCURRENTLY: migrations run in a transaction) blocks writes to the
-- job table while it builds, a moment for a table of a few million rows.
CREATE INDEX asyncjobs_jobs_ready_task_queue_plain
    ON asyncjobs_jobs (task, queue, priority DESC, seq)
    WHERE status = 'queued' AND group_key IS NULL;
CREATE INDEX asyncjobs_jobs_ready_task_queue_grouped
    ON asyncjobs_jobs (task, queue, priority DESC, seq)
    WHERE status = 'queued' AND group_key IS NOT NULL;
CREATE INDEX asyncjobs_jobs_ready_queue_grouped ON asyncjobs_jobs (queue, priority DESC, seq)
    WHERE status = 'queued' AND group_key IS NOT NULL;
