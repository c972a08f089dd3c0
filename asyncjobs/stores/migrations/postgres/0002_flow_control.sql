-- asyncjobs schema, version 2 (PostgreSQL): flow control (rate limits, concurrency limits).

-- The bucket key of a job within its task's named limiter (a customer, a domain),
-- computed from its arguments at enqueue; NULL draws from the limiter's shared bucket.
ALTER TABLE asyncjobs_jobs ADD COLUMN rate_key text;

-- Token buckets shared by every process on this database. `name` is 'task:<task>' for a
-- task's own rate_limit or 'limiter:<name>' for a named limiter; `key` is '' or the
-- job's rate_key. A missing row is a full bucket.
CREATE TABLE asyncjobs_rate_buckets (
    name       text NOT NULL,
    key        text NOT NULL DEFAULT '',
    tokens     double precision NOT NULL,
    updated_at double precision NOT NULL,
    PRIMARY KEY (name, key)
);

CREATE INDEX asyncjobs_jobs_ready_task ON asyncjobs_jobs (task, priority DESC, seq)
    WHERE status = 'queued';
CREATE INDEX asyncjobs_jobs_ready_keyed ON asyncjobs_jobs (task, priority DESC, seq)
    WHERE status = 'queued' AND rate_key IS NOT NULL;
