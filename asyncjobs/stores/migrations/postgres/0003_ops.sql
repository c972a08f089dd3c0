-- asyncjobs schema, version 3 (PostgreSQL): operations (stats, dashboard, pruning).

-- Processes that run workers, upserted by each runner's heartbeat loop.
CREATE TABLE asyncjobs_workers (
    id           text    PRIMARY KEY,     -- host:pid:random, as in JobRow.worker
    host         text    NOT NULL,
    pid          integer NOT NULL,
    started_at   double precision NOT NULL,
    last_seen_at double precision NOT NULL,
    stopped_at   double precision,        -- set on a clean shutdown
    running      integer NOT NULL DEFAULT 0,
    concurrency  integer NOT NULL,
    queues       text                     -- JSON list, NULL for every queue
);
CREATE INDEX asyncjobs_workers_seen ON asyncjobs_workers (last_seen_at);

-- Small key/value store shared by every process (e.g. the dashboard's CSRF key).
CREATE TABLE asyncjobs_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE INDEX asyncjobs_jobs_counts ON asyncjobs_jobs (status, queue, task);
