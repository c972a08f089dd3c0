-- asyncjobs schema, version 2 (SQLite): flow control (rate limits, concurrency limits).

-- The bucket key of a job within its task's named limiter (a customer, a domain),
-- computed from its arguments at enqueue; NULL draws from the limiter's shared bucket.
ALTER TABLE asyncjobs_jobs ADD COLUMN rate_key TEXT;

-- Token buckets shared by every process on this file. `name` is 'task:<task>' for a
-- task's own rate_limit or 'limiter:<name>' for a named limiter; `key` is '' or the
-- job's rate_key. A missing row is a full bucket. The rate itself is configuration
-- and lives in the code of each process.
CREATE TABLE asyncjobs_rate_buckets (
    name       TEXT NOT NULL,
    key        TEXT NOT NULL DEFAULT '',
    tokens     REAL NOT NULL,
    updated_at REAL NOT NULL,                  -- epoch seconds when `tokens` was counted
    PRIMARY KEY (name, key)
) WITHOUT ROWID;

-- A claim under limits reads the head of each task's ready jobs separately, so a
-- backlog held back by its rate limit is skipped by one index seek, not scanned.
CREATE INDEX asyncjobs_jobs_ready_task ON asyncjobs_jobs (task, priority DESC, seq)
    WHERE status = 'queued';
-- The same for keyed jobs only: when a limiter's shared bucket is empty, its keyed
-- jobs (other customers, other domains) are found without scanning unkeyed ones.
CREATE INDEX asyncjobs_jobs_ready_keyed ON asyncjobs_jobs (task, priority DESC, seq)
    WHERE status = 'queued' AND rate_key IS NOT NULL;
