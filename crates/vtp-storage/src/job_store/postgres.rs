//! [`PostgresJobStore`]: the production job store.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use vtp_core::{Error, Result};

use super::credentials::impl_sql_credential_store;
use super::sql::{impl_sql_job_store, map_sqlx};

/// A [`vtp_core::JobStore`] in Postgres.
///
/// A connection that sat idle for more than [`PostgresJobStore::PING_IDLE_AFTER`]
/// is pinged before use (and replaced when dead), so after an outage the pool
/// reconnects by itself without paying a ping on every busy request; while
/// the database is down calls fail fast with [`Error::Unavailable`] after
/// `acquire_timeout`.
#[derive(Debug, Clone)]
pub struct PostgresJobStore {
    pool: PgPool,
}

impl PostgresJobStore {
    /// How long a call waits for a connection before reporting the database unavailable.
    pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

    /// The longest any one statement may run (`statement_timeout`).
    pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

    /// Idle time after which a pooled connection is pinged before use.
    pub const PING_IDLE_AFTER: Duration = Duration::from_millis(250);

    /// Connects to `url` (`postgres://user@host/db`, with `sslmode=require`
    /// or `verify-full&sslrootcert=ca.pem` for TLS) and migrates.
    pub async fn connect(url: &str) -> Result<Self> {
        // No statement may hold a connection (and its locks) for more than
        // STATEMENT_TIMEOUT: a slow query fails instead of stalling the pool.
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::invalid("database_url", e.to_string()))?
            .options([(
                "statement_timeout",
                format!("{}ms", Self::STATEMENT_TIMEOUT.as_millis()),
            )]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Self::ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for < Self::PING_IDLE_AFTER {
                        return Ok(true);
                    }
                    // A dead connection is dropped and another one tried.
                    Ok(sqlx::Connection::ping(conn).await.is_ok())
                })
            })
            .connect_with(options)
            .await
            .map_err(map_sqlx)?;
        Self::from_pool(pool).await
    }

    /// Migrates and wraps an existing pool.
    pub async fn from_pool(pool: PgPool) -> Result<Self> {
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(inner) => map_sqlx(inner),
                other => Error::backend("database", other),
            })?;
        Ok(PostgresJobStore { pool })
    }
}

impl_sql_credential_store!(PostgresJobStore);
impl_sql_job_store!(PostgresJobStore, single_statement = true);
