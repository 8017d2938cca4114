//! [`vtp_core::CredentialStore`] for the SQL job stores: API token hashes
//! and per-job callback secrets in the jobs' own database (migration 0003).

use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;
use vtp_core::{CallbackSecret, Error, JobId, Result, TokenRecord};

use super::driver::{BindExt, Decodes};
use super::{Dialect, SqlJobStore, insert_values, map_sqlx};

/// One `api_tokens` row.
#[derive(Debug, sqlx::FromRow)]
pub struct TokenRow {
    id: String,
    hash: String,
    user_id: String,
    admin: bool,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

impl From<TokenRow> for TokenRecord {
    fn from(row: TokenRow) -> Self {
        TokenRecord {
            id: row.id,
            hash: row.hash,
            user_id: row.user_id,
            admin: row.admin,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        }
    }
}

/// A callback secret, as stored.
pub type SecretRow = (String,);

/// `SELECT <token columns> FROM api_tokens`, for a condition to follow.
fn select_tokens<DB: Dialect>() -> QueryBuilder<DB> {
    QueryBuilder::new("SELECT id, hash, user_id, admin, created_at, revoked_at FROM api_tokens")
}

impl<DB: Dialect> SqlJobStore<DB> {
    /// The tokens `query` selects.
    async fn tokens(&self, query: QueryBuilder<DB>) -> Result<Vec<TokenRecord>> {
        self.fetch_all(query)
            .await?
            .iter()
            .map(|row| {
                <DB as Decodes<TokenRow>>::decode(row)
                    .map(Into::into)
                    .map_err(map_sqlx)
            })
            .collect()
    }

    /// `INSERT INTO job_secrets` the job's secret, when the job exists,
    /// followed by `on_conflict`: whether a row was written.
    async fn write_secret(
        &self,
        job_id: JobId,
        secret: &CallbackSecret,
        on_conflict: &str,
    ) -> Result<bool> {
        let mut query =
            QueryBuilder::new("INSERT INTO job_secrets (job_id, secret, updated_at) SELECT id, ");
        query
            .bind_value(secret.expose())
            .push(", ")
            .bind_value(vtp_core::job::now())
            .push(" FROM jobs WHERE id = ")
            .bind_value(job_id.0)
            .push(" ON CONFLICT (job_id) DO ")
            .push(on_conflict)
            .push(" RETURNING job_id");
        Ok(self.fetch_optional(query).await?.is_some())
    }
}

#[async_trait::async_trait]
impl<DB: Dialect> vtp_core::CredentialStore for SqlJobStore<DB> {
    async fn insert_token(&self, record: &TokenRecord) -> Result<()> {
        let query = insert_values(
            "api_tokens",
            [
                ("id", record.id.as_str().into()),
                ("hash", record.hash.as_str().into()),
                ("user_id", record.user_id.as_str().into()),
                ("admin", record.admin.into()),
                ("created_at", record.created_at.into()),
                ("revoked_at", record.revoked_at.into()),
            ],
        );
        self.execute(query).await.map_err(|e| match e {
            Error::AlreadyExists { .. } => Error::AlreadyExists {
                kind: "token",
                id: record.id.clone(),
            },
            other => other,
        })
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let mut query = select_tokens::<DB>();
        query
            .push(" WHERE hash = ")
            .bind_value(hash)
            .push(" AND revoked_at IS NULL");
        Ok(self.tokens(query).await?.pop())
    }

    async fn revoke_token(&self, id: &str) -> Result<TokenRecord> {
        let mut revoke = QueryBuilder::new("UPDATE api_tokens SET revoked_at = ");
        revoke
            .bind_value(vtp_core::job::now())
            .push(" WHERE id = ")
            .bind_value(id)
            .push(" AND revoked_at IS NULL");
        self.execute(revoke).await?;
        let mut query = select_tokens::<DB>();
        query.push(" WHERE id = ").bind_value(id);
        self.tokens(query)
            .await?
            .pop()
            .ok_or_else(|| Error::not_found("token", id))
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let mut query = select_tokens::<DB>();
        query.push(" ORDER BY created_at DESC, id DESC");
        self.tokens(query).await
    }

    async fn set_job_secret(&self, job_id: JobId, secret: &CallbackSecret) -> Result<()> {
        let written = self
            .write_secret(
                job_id,
                secret,
                "UPDATE SET secret = excluded.secret, updated_at = excluded.updated_at",
            )
            .await?;
        if !written {
            return Err(Error::not_found("job", job_id));
        }
        Ok(())
    }

    async fn job_secret(&self, job_id: JobId) -> Result<Option<CallbackSecret>> {
        let mut query = QueryBuilder::new("SELECT secret FROM job_secrets WHERE job_id = ");
        query.bind_value(job_id.0);
        self.fetch_optional(query)
            .await?
            .map(|row| {
                let (secret,) = <DB as Decodes<SecretRow>>::decode(&row).map_err(map_sqlx)?;
                CallbackSecret::parse(secret)
            })
            .transpose()
    }

    async fn job_secret_or_insert(
        &self,
        job_id: JobId,
        secret: &CallbackSecret,
    ) -> Result<CallbackSecret> {
        self.write_secret(job_id, secret, "NOTHING").await?;
        // The row is never deleted while its job exists: what is there now
        // is the winner.
        vtp_core::CredentialStore::job_secret(self, job_id)
            .await?
            .ok_or_else(|| Error::not_found("job", job_id))
    }
}
