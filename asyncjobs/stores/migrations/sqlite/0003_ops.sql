-- asyncjobs schema, version 3 (SQLite): operations (stats, dashboard, pruning).

-- Processes that run workers, upserted by each runner's heartbeat loop.
CREATE TABLE asyncjobs_workers (
    id           TEXT    PRIMARY KEY,     -- host:pid:random, as in JobRow.worker
    host         TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   REAL    NOT NULL,        -- epoch seconds
    last_seen_at REAL    NOT NULL,
    stopped_at   REAL,                    -- set on a clean shutdown
    running      INTEGER NOT NULL DEFAULT 0,
    concurrency  INTEGER NOT NULL,
    queues       TEXT                     -- JSON list, NULL for every queue
);
CREATE INDEX asyncjobs_workers_seen ON asyncjobs_workers (last_seen_at);

-- Small key/value store shared by every process (e.g. the dashboard's CSRF key).
CREATE TABLE asyncjobs_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Counts by status, queue and task read this index only (no table rows).
CREATE INDEX asyncjobs_jobs_counts ON asyncjobs_jobs (status, queue, task);
