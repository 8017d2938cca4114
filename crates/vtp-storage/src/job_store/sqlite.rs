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

impl_sql_job_store!(SqliteJobStore, owner_lock = None);

/// SQLite has no data-modifying CTEs: the update, the metric and the event
/// are one transaction.
impl super::sql::WriteChange for SqliteJobStore {
    async fn write_change(
        &self,
        expected: vtp_core::Expected,
        next: &vtp_core::Job,
        metric: Option<&vtp_core::TrainingMetric>,
    ) -> Result<Option<vtp_core::Job>> {
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        let row: Option<super::sql::JobRow> = super::sql::bind_update!(
            sqlx::query_as(concat!(
                super::sql::update_job_sql!(),
                " RETURNING ",
                super::sql::job_columns!()
            )),
            next,
            expected
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_sqlx)?;
        let Some(row) = row else {
            return Ok(None);
        };
        if let Some(metric) = metric {
            sqlx::query(
                "INSERT INTO training_metrics (job_id, epoch, metric_values, recorded_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (job_id, epoch) DO UPDATE SET metric_values = excluded.metric_values, \
                 recorded_at = excluded.recorded_at \
                 WHERE training_metrics.metric_values <> excluded.metric_values",
            )
            .bind(metric.job_id.0)
            .bind(i64::from(metric.epoch))
            .bind(sqlx::types::Json(&metric.values))
            .bind(metric.recorded_at)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        }
        let stored: vtp_core::Job = row.try_into()?;
        let event = vtp_core::JobEvent::of_change(Some(expected.status), &stored, metric);
        Self::insert_event(&mut tx, &event).await?;
        tx.commit().await.map_err(map_sqlx)?;
        Ok(Some(stored))
    }
}
