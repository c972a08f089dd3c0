-- asyncjobs schema, version 10 (SQLite): no index of running jobs by lease end.
--
-- Lease recovery, which runs every 30 s at most, is its only reader, and the running
-- jobs are few (every process's concurrency and look-ahead at most): it reads them
-- through the (status, seq) index as fast. Kept, it cost every job an entry written
-- as it started (a dispatched insert, a claim) and one deleted as it finished: about
-- 4 and 1 µs per job in batches of 32 (bench/bench_per_job.py, with and without it).
DROP INDEX asyncjobs_jobs_running;
