-- Training jobs and their per-epoch metrics.
CREATE TABLE jobs (
    id                UUID PRIMARY KEY,
    user_id           TEXT NOT NULL,
    model_name        TEXT NOT NULL,
    framework         TEXT NOT NULL,
    dataset_s3_uri    TEXT NOT NULL,
    config            JSONB NOT NULL,
    status            TEXT NOT NULL CHECK (status IN
                        ('pending', 'queued', 'running', 'completed', 'failed', 'cancelling', 'cancelled')),
    progress          DOUBLE PRECISION NOT NULL CHECK (progress >= 0 AND progress <= 1),
    message           TEXT,
    error             TEXT,
    checkpoint_s3_uri TEXT,
    attempt           INTEGER NOT NULL,
    last_seq          BIGINT NOT NULL,
    revision          BIGINT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL,
    started_at        TIMESTAMPTZ,
    finished_at       TIMESTAMPTZ
);

CREATE INDEX jobs_user_created ON jobs (user_id, created_at DESC, id DESC);
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_status_updated ON jobs (status, updated_at);

CREATE TABLE training_metrics (
    job_id        UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    epoch         BIGINT NOT NULL CHECK (epoch >= 0),
    metric_values JSONB NOT NULL,
    recorded_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (job_id, epoch)
);
