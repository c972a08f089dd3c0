-- asyncjobs schema, version 8 (PostgreSQL): the claim that took a running job.
--
-- A claim whose reply never came (a lost connection, a timeout) may have committed: the
-- store hands its rows out with the worker's next claim, or gives them back when the
-- worker stops. It found them by worker and started_at, which a job dispatched to that
-- worker or taken by its next claim at the same clock reading shares: a job running
-- there could be handed out again, or requeued while it ran. Each claim (and each insert
-- of dispatched jobs) now marks the rows it takes with a token of its own, and only
-- that token finds them. Rows taken before this version keep NULL, which none matches.
ALTER TABLE asyncjobs_jobs ADD COLUMN claim_token text;
