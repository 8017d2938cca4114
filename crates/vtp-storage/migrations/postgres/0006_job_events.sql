-- Every change of a job, numbered by the revision it gave the job and
-- written in the same statement as the change (issue #16): what
-- GET /training/jobs/{id}/events replays after a client's Last-Event-ID.
CREATE TABLE job_events (
    job_id   UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    revision BIGINT NOT NULL,
    event    JSONB NOT NULL,
    PRIMARY KEY (job_id, revision)
);
