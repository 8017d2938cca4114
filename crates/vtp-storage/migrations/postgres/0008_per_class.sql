-- Validation per class of a job's final checkpoint, from its trainer's
-- final report (issue #29).
ALTER TABLE jobs ADD COLUMN per_class JSONB;
