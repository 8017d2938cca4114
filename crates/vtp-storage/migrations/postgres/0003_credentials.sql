-- API tokens (only their SHA-256 is kept) and the per-job secret each
-- trainer signs its reports with. The job secret must be readable to check
-- an HMAC, so it is stored as is; the database is as sensitive as the
-- tokens' hashes are not.
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    user_id     TEXT NOT NULL,
    admin       BOOLEAN NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    revoked_at  TIMESTAMPTZ
);

CREATE TABLE job_secrets (
    job_id      UUID PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    secret      TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
