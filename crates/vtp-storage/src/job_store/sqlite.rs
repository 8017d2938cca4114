//! [`SqliteJobStore`]: the embedded default, one file, no server.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use vtp_core::{Error, Result};

use super::credentials::impl_sql_credential_store;
use super::sql::{impl_sql_job_store, map_sqlx};

/// A [`vtp_core::JobStore`] in a SQLite database file (WAL mode).
#[derive(Debug, Clone)]
pub struct SqliteJobStore {
    pool: SqlitePool,
}

impl SqliteJobStore {
    /// Opens (creating if needed) and migrates the database at `url`
    /// (`sqlite://path/to/file.db` or `sqlite::memory:`). Parent directories
    /// of a file are created.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::invalid("database_url", e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if !in_memory {
            let file = options.get_filename();
            if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    Error::invalid(
                        "database_url",
                        format!("cannot create {}: {e}", parent.display()),
                    )
                })?;
            }
        }
        let pool = SqlitePoolOptions::new()
            // An in-memory database lives in one connection.
            .max_connections(if in_memory { 1 } else { 4 })
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(map_sqlx)?;
        Self::from_pool(pool).await
    }

    /// Opens the database file at `path`.
    pub async fn open(path: &Path) -> Result<Self> {
        Self::connect(&format!("sqlite://{}", path.display())).await
    }

    /// Migrates and wraps an existing pool.
    pub async fn from_pool(pool: SqlitePool) -> Result<Self> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| Error::backend("database", e))?;
        Ok(SqliteJobStore { pool })
    }
}

impl_sql_credential_store!(SqliteJobStore);
impl super::sql::HasDb for SqliteJobStore {
    type Db = sqlx::Sqlite;
}

impl_sql_job_store!(SqliteJobStore, single_statement = false, owner_lock = None);
