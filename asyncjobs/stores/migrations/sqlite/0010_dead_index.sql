-- asyncjobs schema, version 10 (SQLite): the jobs that read as dead, newest first.
--
-- Dead jobs, and jobs whose status this version does not know (written by hand, or by
-- a newer asyncjobs), which read as dead. The dead list, retry_dead and
-- purge(status="dead") select them with this very condition (DEAD_AS_READ in
-- asyncjobs/stores/_statuses.py): over the (status, seq) index a NOT IN read every
-- row; this index holds the dead ones only.
CREATE INDEX asyncjobs_jobs_dead ON asyncjobs_jobs (seq)
    WHERE status NOT IN ('waiting', 'scheduled', 'queued', 'running', 'succeeded', 'cancelled');
