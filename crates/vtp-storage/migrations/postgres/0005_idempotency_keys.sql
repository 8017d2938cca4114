-- Idempotency-Key (issue #14): the key a job was created under (unique per
-- owner) with the digest of that request, and the key it was started under.
ALTER TABLE jobs ADD COLUMN create_key TEXT;
ALTER TABLE jobs ADD COLUMN create_digest TEXT;
ALTER TABLE jobs ADD COLUMN start_key TEXT;
CREATE UNIQUE INDEX jobs_user_create_key ON jobs (user_id, create_key) WHERE create_key IS NOT NULL;
