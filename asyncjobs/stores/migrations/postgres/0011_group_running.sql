-- asyncjobs schema, version 11 (PostgreSQL): one running job per group, kept by the
-- database.
--
-- A claim takes a group's job when its statement's snapshot shows no earlier job of the
-- group unfinished and none running. Two claims at once could each miss the other's:
-- one took a later job while an earlier one became queued (a dead job retried by hand,
-- or an insert that took an earlier seq and committed after), and a second claim, which
-- saw the later job still queued, took the earlier one: the group ran two jobs at once.
-- With this index the second claim waits for the first to commit and then fails; the
-- store makes it again (``retry_deadlocks``), and it sees the group's job running.
--
-- A group that runs two jobs now, so claimed before this version (their processes may
-- still run them, or have died and left them to lease recovery), would make the index
-- fail to build, and the store fail to open. Those jobs are left to end: all but the
-- first of each such group are marked (claim_token), and the index leaves the marked
-- ones out. A claim writes its own token, so a marked job that runs again is held too.
UPDATE asyncjobs_jobs AS j SET claim_token = 'asyncjobs:0011'
WHERE j.group_key IS NOT NULL AND j.status = 'running' AND EXISTS (
    SELECT 1 FROM asyncjobs_jobs AS g
    WHERE g.group_key = j.group_key AND g.status = 'running' AND g.seq < j.seq);
CREATE UNIQUE INDEX asyncjobs_jobs_group_running ON asyncjobs_jobs (group_key)
    WHERE group_key IS NOT NULL AND status = 'running'
        AND claim_token IS DISTINCT FROM 'asyncjobs:0011';
