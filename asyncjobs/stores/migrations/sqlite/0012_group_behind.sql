-- asyncjobs schema, version 12 (SQLite): a group's backlog leaves the ready indexes.
--
-- A group runs one job at a time, in enqueue order, so of its queued jobs only the
-- first can be claimed. All of them were in the ready indexes: a claim read through a
-- group's whole backlog and turned it away job by job (about 25 ms per claim behind
-- 20,000 jobs of one group, over 100 ms behind 100,000), and under a limit the 1,000
-- ready jobs a claim looks through could all be one group's, hiding the jobs after them.
--
-- A job is marked `behind` while an unfinished job of its group (scheduled, queued or
-- running) comes before it, and the ready indexes leave it out. The insert marks it
-- (``insert_jobs``); the triggers below clear the mark of the group's first unfinished
-- job whenever one leaves, whatever wrote the row (a finish, a lease expiry, an
-- operator's cancel or delete). A job that leaves loses its own mark, so one that
-- comes back (a retry by hand, a released chain member) comes back unmarked. Claims
-- still check the group (a later job of it may run): a mark missing costs a claim a
-- row, never a wrong claim; a mark on a group's first unfinished job would hold the
-- group, and the rules above never leave one there. Ungrouped jobs are never marked:
-- the triggers stop at their WHEN.
ALTER TABLE asyncjobs_jobs ADD COLUMN behind INTEGER;

UPDATE asyncjobs_jobs SET behind = 1
WHERE group_key IS NOT NULL AND status IN ('scheduled', 'queued', 'running')
  AND EXISTS (SELECT 1 FROM asyncjobs_jobs AS g
              WHERE g.group_key = asyncjobs_jobs.group_key
                AND g.status IN ('scheduled', 'queued', 'running')
                AND g.seq < asyncjobs_jobs.seq);

DROP INDEX asyncjobs_jobs_ready;
CREATE INDEX asyncjobs_jobs_ready ON asyncjobs_jobs (priority DESC, seq)
    WHERE status = 'queued' AND behind IS NULL;
DROP INDEX asyncjobs_jobs_ready_task;
CREATE INDEX asyncjobs_jobs_ready_task ON asyncjobs_jobs (task, priority DESC, seq)
    WHERE status = 'queued' AND behind IS NULL;
DROP INDEX asyncjobs_jobs_ready_keyed;
CREATE INDEX asyncjobs_jobs_ready_keyed ON asyncjobs_jobs (task, priority DESC, seq)
    WHERE status = 'queued' AND rate_key IS NOT NULL AND behind IS NULL;
DROP INDEX asyncjobs_jobs_ready_key;
CREATE INDEX asyncjobs_jobs_ready_key ON asyncjobs_jobs (task, rate_key, priority DESC, seq)
    WHERE status = 'queued' AND rate_key IS NOT NULL AND behind IS NULL;

-- A job that leaves its group's unfinished jobs (it finished, was cancelled, deleted)
-- loses its mark, and so does the group's first unfinished job now. The IN lists of
-- the conditions are spelt out: a trigger builds an IN list's table on every row.
CREATE TRIGGER asyncjobs_jobs_group_moves_on AFTER UPDATE OF status ON asyncjobs_jobs
WHEN old.group_key IS NOT NULL
  AND (old.status = 'scheduled' OR old.status = 'queued' OR old.status = 'running')
  AND NOT (new.status = 'scheduled' OR new.status = 'queued' OR new.status = 'running')
BEGIN
    UPDATE asyncjobs_jobs SET behind = NULL WHERE seq = old.seq AND old.behind IS NOT NULL;
    UPDATE asyncjobs_jobs SET behind = NULL
    WHERE seq = (SELECT seq FROM asyncjobs_jobs
                 WHERE group_key = old.group_key AND status IN ('scheduled', 'queued', 'running')
                 ORDER BY seq LIMIT 1)
      AND behind IS NOT NULL;
END;

CREATE TRIGGER asyncjobs_jobs_group_moves_on_deleted AFTER DELETE ON asyncjobs_jobs
WHEN old.group_key IS NOT NULL
  AND (old.status = 'scheduled' OR old.status = 'queued' OR old.status = 'running')
BEGIN
    UPDATE asyncjobs_jobs SET behind = NULL
    WHERE seq = (SELECT seq FROM asyncjobs_jobs
                 WHERE group_key = old.group_key AND status IN ('scheduled', 'queued', 'running')
                 ORDER BY seq LIMIT 1)
      AND behind IS NOT NULL;
END;
