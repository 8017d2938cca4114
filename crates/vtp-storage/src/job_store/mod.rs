//! [`vtp_core::JobStore`] implementations and [`connect`], which picks one by URL.

use std::sync::Arc;

use vtp_core::{Error, JobStore, Result};

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// The embedded default: a SQLite file under `./.vtp/`.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://./.vtp/vtp.db";

/// Opens (and migrates) the job store that `url` names:
/// `sqlite://path`, `sqlite::memory:`, `postgres://...` / `postgresql://...`, or `memory://`.
///
/// # Errors
/// [`Error::InvalidInput`] for an unknown scheme or a backend not compiled in,
/// [`Error::Unavailable`] when the database cannot be reached.
pub async fn connect(url: &str) -> Result<Arc<dyn JobStore>> {
    let scheme = url.split(':').next().unwrap_or_default();
    match scheme {
        "memory" => Ok(Arc::new(memory::InMemoryJobStore::new())),
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Arc::new(sqlite::SqliteJobStore::connect(url).await?)),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Arc::new(postgres::PostgresJobStore::connect(url).await?)),
        _ => Err(Error::invalid(
            "database_url",
            format!("unsupported database URL {url:?}: use sqlite://, postgres:// or memory://"),
        )),
    }
}
