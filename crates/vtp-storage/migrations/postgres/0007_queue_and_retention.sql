-- Many users, many jobs (issue #27).
--
-- The queue: a started job waits in `queued` until the backend hands it to
-- its launcher (`launched_at`), ordered by `priority`, fair share between
-- owners and `queued_at`; `not_before` spaces out relaunches. The partial
-- index holds only the waiting jobs, which the dispatcher reads in order.
-- No column a trainer's heartbeat changes is indexed: those updates stay HOT.
ALTER TABLE jobs ADD COLUMN epochs INTEGER NOT NULL DEFAULT 5;
UPDATE jobs SET epochs = (config->>'epochs')::integer
    WHERE jsonb_typeof(config->'epochs') = 'number';
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN queued_at TIMESTAMPTZ;
ALTER TABLE jobs ADD COLUMN launched_at TIMESTAMPTZ;
ALTER TABLE jobs ADD COLUMN not_before TIMESTAMPTZ;
-- Deletion: a tombstone first (the job answers 404 from then on), then its
-- objects, then its rows; retention finds finished jobs by `finished_at`.
ALTER TABLE jobs ADD COLUMN deleted_at TIMESTAMPTZ;
-- Jobs started before the queue existed were handed to a launcher at once.
UPDATE jobs SET queued_at = created_at WHERE status <> 'pending';
UPDATE jobs SET launched_at = updated_at WHERE status IN ('queued', 'running', 'cancelling');
CREATE INDEX jobs_waiting ON jobs (user_id, priority DESC, queued_at, id)
    WHERE status = 'queued' AND launched_at IS NULL AND deleted_at IS NULL;
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_deleted ON jobs (deleted_at) WHERE deleted_at IS NOT NULL;
-- A job's event log keeps its history (status changes, epochs), not every
-- heartbeat, and not its config again in every event (a job's config never
-- changes; the event stream puts the job's own back).
DELETE FROM job_events WHERE event->>'kind' = 'progress';
UPDATE job_events SET event = jsonb_set(event, '{job,config}', 'null'::jsonb)
    WHERE event->'job'->'config' <> 'null'::jsonb;
