-- asyncjobs schema, version 1 (SQLite). Tables are prefixed so the job table can
-- live in the application's own database file (transactional enqueue).
CREATE TABLE asyncjobs_jobs (
    seq              INTEGER PRIMARY KEY,      -- enqueue order (rowid)
    id               TEXT    NOT NULL UNIQUE,
    task             TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    status           TEXT    NOT NULL,         -- waiting scheduled queued running succeeded dead cancelled
    priority         INTEGER NOT NULL DEFAULT 0,
    payload          TEXT    NOT NULL,         -- JSON {"args": [...], "kwargs": {...}}
    options          TEXT,                     -- JSON: per-call settings that win
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    run_at           REAL    NOT NULL,         -- epoch seconds
    enqueued_at      REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    lease_until      REAL,
    worker           TEXT,
    result           TEXT,                     -- JSON
    error            TEXT,
    idempotency_key  TEXT,
    group_key        TEXT,
    progress         REAL,
    progress_message TEXT,
    chain_next       TEXT,                     -- id of the chain member released on success
    batch_id         TEXT                      -- id of the batch's on_complete job
);

-- Claims scan only due jobs, in priority then enqueue order; finished rows cost nothing.
CREATE INDEX asyncjobs_jobs_ready ON asyncjobs_jobs (priority DESC, seq) WHERE status = 'queued';
CREATE INDEX asyncjobs_jobs_scheduled ON asyncjobs_jobs (run_at) WHERE status = 'scheduled';
CREATE INDEX asyncjobs_jobs_running ON asyncjobs_jobs (lease_until) WHERE status = 'running';
CREATE INDEX asyncjobs_jobs_status ON asyncjobs_jobs (status, seq);
CREATE INDEX asyncjobs_jobs_finished ON asyncjobs_jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX asyncjobs_jobs_idempotency ON asyncjobs_jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX asyncjobs_jobs_group ON asyncjobs_jobs (group_key, seq)
    WHERE group_key IS NOT NULL AND status IN ('scheduled', 'queued', 'running');
CREATE INDEX asyncjobs_jobs_batch ON asyncjobs_jobs (batch_id) WHERE batch_id IS NOT NULL;
