-- asyncjobs schema, version 16 (SQLite): what retention deletes besides jobs, indexed
-- by age.
--
-- A prune deletes a limiter's buckets that have refilled (counted before a time), but
-- the table is keyed by (name, key): each prune batch read every bucket of the name,
-- 100,000 for a keyed limiter of 100,000 users, every minute in every process, even
-- when none had refilled. By (name, updated_at), a batch reads the ones it deletes.
-- A claim that takes tokens moves its buckets' entries here too (one entry each).
CREATE INDEX asyncjobs_rate_buckets_age ON asyncjobs_rate_buckets (name, updated_at);
-- The tallies of deleted batch members go past retention, once their batch has no job
-- left: a prune read every tally. By finished_at, it reads those past retention. A
-- deletion from a batch moves its tally's entry (one a batch and status).
CREATE INDEX asyncjobs_batch_deleted_age ON asyncjobs_batch_deleted (finished_at);
