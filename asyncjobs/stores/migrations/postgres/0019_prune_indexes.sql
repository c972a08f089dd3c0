-- asyncjobs schema, version 19 (PostgreSQL): what retention deletes besides jobs,
-- indexed by age.
--
-- A prune deletes a limiter's buckets that have refilled (counted before a time), but
-- the table is keyed by (name, key): each prune batch read every bucket of the name,
-- 100,000 rows removed by filter for a keyed limiter of 100,000 users, every minute
-- in every process, even when none had refilled. By (name, updated_at), a batch reads
-- the ones it deletes. A claim that takes tokens writes its buckets' entries here too:
-- with updated_at indexed, its update of a bucket is no longer a HOT update, and adds
-- an entry to each of the table's two indexes (vacuum clears the old ones).
CREATE INDEX asyncjobs_rate_buckets_age ON asyncjobs_rate_buckets (name, updated_at);
-- The tallies of deleted batch members go past retention, once their batch has no job
-- left: a prune read every tally, and hashed every batch member and every job id
-- against them. By finished_at, it reads those past retention. A deletion from a
-- batch writes its tally's entry here too (one a batch and status).
CREATE INDEX asyncjobs_batch_deleted_age ON asyncjobs_batch_deleted (finished_at);
