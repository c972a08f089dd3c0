-- asyncjobs schema, version 4 (SQLite): cancelling a running job asks its worker to stop.
--
-- The job stays 'running' (it still holds its concurrency slot and its group) until its
-- worker stops it and writes 'cancelled', or its lease expires: a cancel from another
-- process no longer frees the slot while the job still runs. The worker learns of the
-- request at its next heartbeat.
ALTER TABLE asyncjobs_jobs ADD COLUMN cancel_requested_at REAL;
