//! [`SqliteJobStore`]: the embedded default, one file, no server.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use vtp_core::{Error, Result};

use super::sql::{Dialect, SqlJobStore, map_sqlx};

/// A [`vtp_core::JobStore`] in a SQLite database file (WAL mode).
pub type SqliteJobStore = SqlJobStore<sqlx::Sqlite>;

impl SqlJobStore<sqlx::Sqlite> {
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
        Ok(SqlJobStore { pool, own: () })
    }
}

/// SQLite allows one writer at a time, so a quota's count needs no lock;
/// it has no data-modifying CTEs, so a compare-and-set is a transaction of
/// its statements.
impl Dialect for sqlx::Sqlite {
    type Own = ();

    fn owner_lock(_owner: &str) -> Option<sqlx::QueryBuilder<Self>> {
        None
    }

    fn write_change<'a>(
        store: &'a SqliteJobStore,
        expected: vtp_core::Expected,
        next: &'a vtp_core::Job,
        metric: Option<&'a vtp_core::TrainingMetric>,
    ) -> impl std::future::Future<Output = Result<Option<vtp_core::Job>>> + Send + 'a {
        store.write_change_in_transaction(expected, next, metric)
    }
}
