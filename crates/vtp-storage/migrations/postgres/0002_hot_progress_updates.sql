-- Progress reports rewrite a job row many times a minute. Postgres can do
-- that as a heap-only (HOT) update, with no new index entries, only when no
-- indexed column changes and the page has room: so `updated_at` (which every
-- report changes) leaves the indexes, listing by status is served by
-- (status, created_at), which matches its ORDER BY, and pages keep 30% free.
-- The sweeper's `updated_at < $cutoff` is a filter over one status's rows.
DROP INDEX jobs_status_updated;
CREATE INDEX jobs_status_created ON jobs (status, created_at DESC, id DESC);
ALTER TABLE jobs SET (fillfactor = 70);
