-- asyncjobs schema, version 1 (PostgreSQL). Created in the first schema of the
-- connection's search_path, so the job table can live next to the application's
-- own tables (transactional enqueue). Times are epoch seconds, as in SQLite.
CREATE TABLE asyncjobs_jobs (
    seq              bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- enqueue order
    id               text    NOT NULL UNIQUE,
    task             text    NOT NULL,
    queue            text    NOT NULL,
    status           text    NOT NULL,  -- waiting scheduled queued running succeeded dead cancelled
    priority         integer NOT NULL DEFAULT 0,
    payload          text    NOT NULL,  -- JSON {"args": [...], "kwargs": {...}}, kept verbatim
    options          text,              -- JSON: per-call settings that win
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    run_at           double precision NOT NULL,
    enqueued_at      double precision NOT NULL,
    started_at       double precision,
    finished_at      double precision,
    lease_until      double precision,
    worker           text,
    result           text,              -- JSON
    error            text,
    idempotency_key  text,
    group_key        text,
    progress         double precision,
    progress_message text,
    chain_next       text,              -- id of the chain member released on success
    batch_id         text               -- id of the batch's on_complete job
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

-- Wake-ups: every insert (also one made through the application's own connection)
-- notifies the schema's channel when its transaction commits. Workers LISTEN on it.
CREATE FUNCTION asyncjobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(left('asyncjobs:' || TG_TABLE_SCHEMA, 63), '');
    RETURN NULL;
END
$$;

CREATE TRIGGER asyncjobs_jobs_notify AFTER INSERT ON asyncjobs_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION asyncjobs_notify();
