//! [`vtp_core::JobStore`] implementations and [`connect`], which picks one by URL.

use std::sync::Arc;

use vtp_core::{CredentialStore, Error, JobStore, LeaderElector, Result};

#[cfg(feature = "postgres")]
mod group_commit;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod sql;
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
    Ok(connect_stores(url).await?.jobs)
}

/// The job store and the credential store of one database (they share its
/// connection pool).
#[derive(Debug, Clone)]
pub struct Stores {
    /// Jobs and metrics.
    pub jobs: Arc<dyn JobStore>,
    /// API token hashes and per-job callback secrets.
    pub credentials: Arc<dyn CredentialStore>,
    /// Who of the backends sharing the database leads.
    pub leader: Arc<dyn LeaderElector>,
}

impl Stores {
    /// Both roles of one store, used by one process (which always leads).
    pub fn new<S: JobStore + CredentialStore>(store: S) -> Self {
        let store = Arc::new(store);
        Stores {
            jobs: store.clone(),
            credentials: store,
            leader: Arc::new(vtp_core::SoleLeader),
        }
    }

    /// Fresh in-memory stores.
    pub fn memory() -> Self {
        Self::new(memory::InMemoryJobStore::new())
    }
}

/// Opens (and migrates) the database `url` names, as in [`connect`], with
/// its credential store.
///
/// # Errors
/// As [`connect`].
pub async fn connect_stores(url: &str) -> Result<Stores> {
    let scheme = url.split(':').next().unwrap_or_default();
    match scheme {
        "memory" => Ok(Stores::new(memory::InMemoryJobStore::new())),
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Stores::new(sqlite::SqliteJobStore::connect(url).await?)),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            let store = postgres::PostgresJobStore::connect(url).await?;
            let leader = Arc::new(store.leader_elector());
            Ok(Stores {
                leader,
                ..Stores::new(store)
            })
        }
        #[cfg(not(feature = "sqlite"))]
        "sqlite" => Err(Error::invalid(
            "database_url",
            "this build has no SQLite support (feature `sqlite`)",
        )),
        #[cfg(not(feature = "postgres"))]
        "postgres" | "postgresql" => Err(Error::invalid(
            "database_url",
            "this build has no Postgres support (feature `postgres`)",
        )),
        _ => Err(Error::invalid(
            "database_url",
            format!("unsupported database URL {url:?}: use sqlite://, postgres:// or memory://"),
        )),
    }
}
