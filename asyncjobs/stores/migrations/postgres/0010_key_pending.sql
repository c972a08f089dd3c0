-- asyncjobs schema, version 10 (PostgreSQL): jobs whose rate-limit key is not computed yet.
--
-- A keyed limiter's key comes from the job's arguments, by the task's definition. A job
-- enqueued by name in a process that does not define its task (an enqueue-only web
-- process) cannot get one there: it is marked (key_pending true), and a worker that
-- defines the task computes the key before it claims the limiter's jobs behind it.
-- NULL for every other job; the index holds the marked ones while they are queued, in
-- claim order, so a claim finds the first of each task in one seek.
ALTER TABLE asyncjobs_jobs ADD COLUMN key_pending boolean;
CREATE INDEX asyncjobs_jobs_key_pending ON asyncjobs_jobs (task, priority DESC, seq)
    WHERE key_pending IS NOT NULL AND status = 'queued';
