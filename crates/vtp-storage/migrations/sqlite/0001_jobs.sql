-- Training jobs and their per-epoch metrics.
CREATE TABLE jobs (
    id                BLOB PRIMARY KEY,
    user_id           TEXT NOT NULL,
    model_name        TEXT NOT NULL,
    framework         TEXT NOT NULL,
    dataset_s3_uri    TEXT NOT NULL,
    config            TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN
                        ('pending', 'queued', 'running', 'completed', 'failed', 'cancelling', 'cancelled')),
    progress          REAL NOT NULL CHECK (progress >= 0 AND progress <= 1),
    message           TEXT,
    error             TEXT,
    checkpoint_s3_uri TEXT,
    attempt           INTEGER NOT NULL,
    last_seq          INTEGER NOT NULL,
    revision          INTEGER NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    started_at        TEXT,
    finished_at       TEXT
);

CREATE INDEX jobs_user_created ON jobs (user_id, created_at DESC, id DESC);
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_status_updated ON jobs (status, updated_at);

CREATE TABLE training_metrics (
    job_id        BLOB NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    epoch         INTEGER NOT NULL CHECK (epoch >= 0),
    metric_values TEXT NOT NULL,
    recorded_at   TEXT NOT NULL,
    PRIMARY KEY (job_id, epoch)
);
