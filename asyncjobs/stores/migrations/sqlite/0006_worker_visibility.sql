-- asyncjobs schema, version 6 (SQLite): each worker's own visibility timeout.
--
-- A worker heartbeats every third of its visibility timeout. Another process judged
-- it alive by its own setting: a worker with a longer timeout than the observer's
-- showed as dead between its heartbeats. NULL (a worker of an earlier version): the
-- observer's own.
ALTER TABLE asyncjobs_workers ADD COLUMN visibility_timeout REAL;
