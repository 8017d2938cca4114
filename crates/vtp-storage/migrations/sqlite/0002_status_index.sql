-- As in Postgres: no index on `updated_at`, which every progress report
-- changes; listing by status is served by (status, created_at).
DROP INDEX jobs_status_updated;
CREATE INDEX jobs_status_created ON jobs (status, created_at DESC, id DESC);
