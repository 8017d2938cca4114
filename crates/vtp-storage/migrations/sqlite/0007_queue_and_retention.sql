-- Many users, many jobs (issue #27); see the Postgres migration of the same
-- name for what each column is for.
ALTER TABLE jobs ADD COLUMN epochs INTEGER NOT NULL DEFAULT 5;
UPDATE jobs SET epochs = json_extract(config, '$.epochs')
    WHERE json_type(config, '$.epochs') = 'integer';
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN queued_at TEXT;
ALTER TABLE jobs ADD COLUMN launched_at TEXT;
ALTER TABLE jobs ADD COLUMN not_before TEXT;
ALTER TABLE jobs ADD COLUMN deleted_at TEXT;
UPDATE jobs SET queued_at = created_at WHERE status <> 'pending';
UPDATE jobs SET launched_at = updated_at WHERE status IN ('queued', 'running', 'cancelling');
CREATE INDEX jobs_waiting ON jobs (user_id, priority DESC, queued_at, id)
    WHERE status = 'queued' AND launched_at IS NULL AND deleted_at IS NULL;
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_deleted ON jobs (deleted_at) WHERE deleted_at IS NOT NULL;
DELETE FROM job_events WHERE json_extract(event, '$.kind') = 'progress';
UPDATE job_events SET event = json_set(event, '$.job.config', json('null'))
    WHERE json_type(event, '$.job.config') <> 'null';
