-- asyncjobs schema, version 9 (SQLite): the ready jobs of a keyed limiter, by key.
--
-- A claim reads a task's ready jobs in claim order, up to a window of 1,000. When
-- that window is all jobs of keys whose buckets are empty (a bulk send to one domain),
-- this index finds the keys behind it one seek each, and each key's next jobs in
-- claim order, so a key with tokens does not wait for that backlog to move.
CREATE INDEX asyncjobs_jobs_ready_key ON asyncjobs_jobs (task, rate_key, priority DESC, seq)
    WHERE status = 'queued' AND rate_key IS NOT NULL;
