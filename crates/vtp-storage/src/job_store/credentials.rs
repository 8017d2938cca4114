//! [`vtp_core::CredentialStore`] for the SQL job stores: API token hashes
//! and per-job callback secrets in the jobs' own database (migration 0003).

use chrono::{DateTime, Utc};
use vtp_core::TokenRecord;

/// One `api_tokens` row.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct TokenRow {
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

/// Implements `CredentialStore` for `$store`, a struct with a `pool` field.
macro_rules! impl_sql_credential_store {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl vtp_core::CredentialStore for $store {
            async fn insert_token(&self, record: &vtp_core::TokenRecord) -> vtp_core::Result<()> {
                sqlx::query(
                    "INSERT INTO api_tokens (id, hash, user_id, admin, created_at, revoked_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&record.id)
                .bind(&record.hash)
                .bind(&record.user_id)
                .bind(record.admin)
                .bind(record.created_at)
                .bind(record.revoked_at)
                .execute(&self.pool)
                .await
                .map_err(|e| match $crate::job_store::sql::map_sqlx(e) {
                    vtp_core::Error::AlreadyExists { .. } => vtp_core::Error::AlreadyExists {
                        kind: "token",
                        id: record.id.clone(),
                    },
                    other => other,
                })?;
                Ok(())
            }

            async fn token_by_hash(
                &self,
                hash: &str,
            ) -> vtp_core::Result<Option<vtp_core::TokenRecord>> {
                let row: Option<$crate::job_store::credentials::TokenRow> = sqlx::query_as(
                    "SELECT id, hash, user_id, admin, created_at, revoked_at FROM api_tokens \
                     WHERE hash = $1 AND revoked_at IS NULL",
                )
                .bind(hash)
                .fetch_optional(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                Ok(row.map(Into::into))
            }

            async fn revoke_token(&self, id: &str) -> vtp_core::Result<vtp_core::TokenRecord> {
                sqlx::query(
                    "UPDATE api_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                )
                .bind(id)
                .bind(vtp_core::job::now())
                .execute(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                let row: Option<$crate::job_store::credentials::TokenRow> = sqlx::query_as(
                    "SELECT id, hash, user_id, admin, created_at, revoked_at FROM api_tokens WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                row.map(Into::into)
                    .ok_or_else(|| vtp_core::Error::not_found("token", id))
            }

            async fn list_tokens(&self) -> vtp_core::Result<Vec<vtp_core::TokenRecord>> {
                let rows: Vec<$crate::job_store::credentials::TokenRow> = sqlx::query_as(
                    "SELECT id, hash, user_id, admin, created_at, revoked_at FROM api_tokens \
                     ORDER BY created_at DESC, id DESC",
                )
                .fetch_all(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn set_job_secret(
                &self,
                job_id: vtp_core::JobId,
                secret: &vtp_core::CallbackSecret,
            ) -> vtp_core::Result<()> {
                let done = sqlx::query(
                    "INSERT INTO job_secrets (job_id, secret, updated_at) \
                     SELECT id, $2, $3 FROM jobs WHERE id = $1 \
                     ON CONFLICT (job_id) DO UPDATE SET secret = excluded.secret, updated_at = excluded.updated_at",
                )
                .bind(job_id.0)
                .bind(secret.expose())
                .bind(vtp_core::job::now())
                .execute(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                if done.rows_affected() == 0 {
                    return Err(vtp_core::Error::not_found("job", job_id));
                }
                Ok(())
            }

            async fn job_secret(
                &self,
                job_id: vtp_core::JobId,
            ) -> vtp_core::Result<Option<vtp_core::CallbackSecret>> {
                let secret: Option<String> =
                    sqlx::query_scalar("SELECT secret FROM job_secrets WHERE job_id = $1")
                        .bind(job_id.0)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err($crate::job_store::sql::map_sqlx)?;
                secret.map(vtp_core::CallbackSecret::parse).transpose()
            }

            async fn job_secret_or_insert(
                &self,
                job_id: vtp_core::JobId,
                secret: &vtp_core::CallbackSecret,
            ) -> vtp_core::Result<vtp_core::CallbackSecret> {
                sqlx::query(
                    "INSERT INTO job_secrets (job_id, secret, updated_at) \
                     SELECT id, $2, $3 FROM jobs WHERE id = $1 \
                     ON CONFLICT (job_id) DO NOTHING",
                )
                .bind(job_id.0)
                .bind(secret.expose())
                .bind(vtp_core::job::now())
                .execute(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                // The row is never deleted while its job exists: what is
                // there now is the winner.
                vtp_core::CredentialStore::job_secret(self, job_id)
                    .await?
                    .ok_or_else(|| vtp_core::Error::not_found("job", job_id))
            }
        }
    };
}

pub(crate) use impl_sql_credential_store;
