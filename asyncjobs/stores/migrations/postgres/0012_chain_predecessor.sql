-- asyncjobs schema, version 12 (PostgreSQL): chain members found by the member after
-- them.
--
-- A chain member retried by hand before it ever ran waits again for the member before
-- it, found (and locked) by its chain_next. Without an index that read every row, once
-- per job: a bulk retry of a thousand cancelled members in a table of a million jobs
-- read a billion rows. Only chain members (chain_next set) have an entry.
CREATE INDEX asyncjobs_jobs_chain_next ON asyncjobs_jobs (chain_next)
    WHERE chain_next IS NOT NULL;
