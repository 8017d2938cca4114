//! [`PostgresJobStore`]: the production job store.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use vtp_core::{Error, LeaderElector, LeaderTerm, Result};

use super::group_commit::GroupCommit;
use super::sql::{BindExt, Dialect, SqlJobStore, map_sqlx};

/// A [`vtp_core::JobStore`] in Postgres.
///
/// A connection that sat idle for more than [`PostgresJobStore::PING_IDLE_AFTER`]
/// is pinged before use (and replaced when dead), so after an outage the pool
/// reconnects by itself without paying a ping on every busy request; while
/// the database is down calls fail fast with [`Error::Unavailable`] after
/// `acquire_timeout`.
pub type PostgresJobStore = SqlJobStore<sqlx::Postgres>;

/// What the Postgres store keeps besides its pool.
#[derive(Debug, Clone)]
pub struct PostgresOwn {
    /// What the pool connects with, for the leader's own connection.
    options: Option<PgConnectOptions>,
    /// Compare-and-sets arriving together are written together.
    group: Arc<GroupCommit>,
}

impl SqlJobStore<sqlx::Postgres> {
    /// Connections to the database: one for each group-commit writer
    /// (which holds its own while changes keep coming), and four more, so
    /// that reads never wait for the writers to go idle.
    pub const MAX_CONNECTIONS: u32 = GroupCommit::WRITERS as u32 + 4;

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
        // The server probes an idle connection after 5 s (and gives up on
        // it after three unanswered probes 2 s apart): a backend whose
        // machine vanished loses its leader lock in seconds, not after
        // the kernel's two hours.
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::invalid("database_url", e.to_string()))?
            .options([
                (
                    "statement_timeout",
                    format!("{}ms", Self::STATEMENT_TIMEOUT.as_millis()),
                ),
                ("tcp_keepalives_idle", "5".to_owned()),
                ("tcp_keepalives_interval", "2".to_owned()),
                ("tcp_keepalives_count", "3".to_owned()),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(Self::MAX_CONNECTIONS)
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
            .connect_with(options.clone())
            .await
            .map_err(map_sqlx)?;
        let mut store = Self::from_pool(pool).await?;
        store.own.options = Some(options);
        Ok(store)
    }

    /// The leader election of the backends sharing this database: a
    /// session advisory lock held on a connection of its own.
    pub fn leader_elector(&self) -> PostgresLeaderElector {
        PostgresLeaderElector {
            options: self
                .own
                .options
                .clone()
                .unwrap_or_else(|| (*self.pool.connect_options()).clone()),
            spare: std::sync::Arc::new(tokio::sync::Mutex::new(None)),
        }
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
        Ok(SqlJobStore {
            pool,
            own: PostgresOwn {
                options: None,
                group: Arc::new(GroupCommit::default()),
            },
        })
    }
}

/// [`LeaderElector`] on Postgres: the leader holds the session advisory
/// lock [`PostgresLeaderElector::LOCK_KEY`] on a connection of its own.
/// When that process dies its connection closes and Postgres releases the
/// lock at once (within the keepalive probes, for a vanished machine); the
/// next follower to try takes it.
#[derive(Debug, Clone)]
pub struct PostgresLeaderElector {
    options: PgConnectOptions,
    /// A follower's connection, kept between tries.
    spare: std::sync::Arc<tokio::sync::Mutex<Option<PgConnection>>>,
}

impl PostgresLeaderElector {
    /// The advisory lock's key ("VTP_LEAD" in ASCII).
    pub const LOCK_KEY: i64 = 0x5654_505F_4C45_4144;
    /// How often a leader checks that its connection, and so its lock, lives.
    pub const CHECK_EVERY: Duration = Duration::from_secs(1);
    /// How long that check may take before the term is taken for lost.
    pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
}

#[async_trait::async_trait]
impl LeaderElector for PostgresLeaderElector {
    async fn try_acquire(&self) -> Result<Option<Box<dyn LeaderTerm>>> {
        let mut spare = self.spare.lock().await;
        let mut conn = match spare.take() {
            Some(conn) => conn,
            None => PgConnection::connect_with(&self.options)
                .await
                .map_err(map_sqlx)?,
        };
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(Self::LOCK_KEY)
            .fetch_one(&mut conn)
            .await
            .map_err(map_sqlx)?;
        if !got {
            *spare = Some(conn);
            return Ok(None);
        }
        Ok(Some(Box::new(PostgresTerm { conn: Some(conn) })))
    }
}

/// A term: the connection holding the lock.
#[derive(Debug)]
struct PostgresTerm {
    conn: Option<PgConnection>,
}

#[async_trait::async_trait]
impl LeaderTerm for PostgresTerm {
    async fn lost(&mut self) {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return std::future::pending().await;
            };
            tokio::time::sleep(PostgresLeaderElector::CHECK_EVERY).await;
            let alive = tokio::time::timeout(
                PostgresLeaderElector::CHECK_TIMEOUT,
                sqlx::query("SELECT 1").execute(&mut *conn),
            )
            .await;
            if !matches!(alive, Ok(Ok(_))) {
                tracing::warn!("the leader's database connection failed; leadership lost");
                // Dropped: if the server still holds it, closing releases the lock.
                self.conn = None;
                return;
            }
        }
    }
}

/// A quota's count is serialised per owner by a transaction-scoped
/// advisory lock; compare-and-sets go through the group commit: one
/// statement for those that arrive together (`group_commit.rs`).
impl Dialect for sqlx::Postgres {
    type Own = PostgresOwn;

    fn owner_lock(owner: &str) -> Option<sqlx::QueryBuilder<Self>> {
        let mut lock = sqlx::QueryBuilder::new(
            "SELECT pg_advisory_xact_lock(hashtextextended('vtp-owner:' || ",
        );
        lock.bind_value(owner).push(", 0))");
        Some(lock)
    }

    fn write_change<'a>(
        store: &'a PostgresJobStore,
        expected: vtp_core::Expected,
        next: &'a vtp_core::Job,
        metric: Option<&'a vtp_core::TrainingMetric>,
    ) -> impl std::future::Future<Output = Result<Option<vtp_core::Job>>> + Send + 'a {
        store
            .own
            .group
            .compare_and_set(&store.pool, expected, next, metric)
    }
}
