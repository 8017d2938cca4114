-- API tokens (only their SHA-256 is kept) and the per-job secret each
-- trainer signs its reports with (readable: an HMAC needs it).
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    user_id     TEXT NOT NULL,
    admin       BOOLEAN NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

CREATE TABLE job_secrets (
    job_id      BLOB PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    secret      TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
