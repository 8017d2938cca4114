-- Relaunched attempts (issue #14): the checkpoint set a new attempt resumes
-- from, and how each earlier attempt ended.
ALTER TABLE jobs ADD COLUMN last_checkpoint_s3_uri TEXT;
ALTER TABLE jobs ADD COLUMN attempts JSONB NOT NULL DEFAULT '[]';
