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
CREATE UNIQUE INDEX asyncjobs_jobs_group_running ON asyncjobs_jobs (group_key)
    WHERE group_key IS NOT NULL AND status = 'running';
