-- asyncjobs schema, version 13 (SQLite): the claim cursors past the window are deleted.
--
-- Claims under limits once kept how far they had walked past their window in
-- asyncjobs_meta, one row per task: `keys past the window:<task>` (the keys of a keyed
-- limiter) and `groups past the window:<task>` (the groups of a task). Each claim that
-- moved one wrote the file, which other processes took for a change. The walks now
-- live in each store's memory (_sqlite_limits.Walks) and nothing reads those rows, so
-- a file upgraded from then kept them for good. GLOB, unlike LIKE, minds the case.
DELETE FROM asyncjobs_meta
WHERE key GLOB 'keys past the window:*' OR key GLOB 'groups past the window:*';
