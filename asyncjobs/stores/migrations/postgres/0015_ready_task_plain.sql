-- asyncjobs schema, version 15 (PostgreSQL): claims under limits read a task's groups'
-- heads, not their backlog.
--
-- A claim under a concurrency or rate limit walked a task's ready jobs in claim order
-- and tested each against its group: a group of 20,000 queued jobs was read whole by
-- every claim. It now walks a few and, when a group's backlog fills them, reads the
-- task's jobs of no group apart from its groups' heads. This index finds those jobs
-- (asyncjobs_jobs_ready_task has the task's grouped jobs too, and
-- asyncjobs_jobs_ready_plain the other tasks' jobs, which such a claim would read
-- through).
--
-- CREATE INDEX (not CONCURRENTLY: migrations run in a transaction) blocks writes to the
-- job table while it builds, a moment for a table of a few million rows.
CREATE INDEX asyncjobs_jobs_ready_task_plain ON asyncjobs_jobs (task, priority DESC, seq)
    WHERE status = 'queued' AND group_key IS NULL;
