//! Who does the work only one backend may do at a time: the [`LeaderElector`].
//!
//! Any number of backends may serve the API against one database. The
//! queue's dispatcher, the stale-job sweeper, the launcher's reconciler and
//! retention run on one of them, the leader. Every write they make is a
//! compare-and-set, so a short overlap of two leaders (one that lost its
//! term and has not noticed yet) can cost a lost race, never a job launched
//! twice; leadership bounds how much such work is wasted.

use std::fmt;

use async_trait::async_trait;

use crate::error::Result;

/// Elects one leader among the backends sharing a database.
///
/// # Contract
/// - `try_acquire` returns a term when no other process holds one, and
///   `None` (at once) while another does.
/// - A term lasts until [`LeaderTerm::lost`] resolves: the process that
///   held it died (its hold on the database went with it), or this one can
///   no longer tell that it holds it. Another process may then acquire one.
///
/// # Errors
/// [`crate::Error::Unavailable`] when the database cannot be reached.
#[async_trait]
pub trait LeaderElector: Send + Sync + fmt::Debug + 'static {
    /// Becomes the leader, if no one else is.
    async fn try_acquire(&self) -> Result<Option<Box<dyn LeaderTerm>>>;
}

/// One process's time as the leader.
#[async_trait]
pub trait LeaderTerm: Send + fmt::Debug {
    /// Resolves when the term has ended. Dropping the term ends it.
    async fn lost(&mut self);
}

/// The elector of a database only one process uses (SQLite, memory): that
/// process always leads.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoleLeader;

#[derive(Debug)]
struct SoleTerm;

#[async_trait]
impl LeaderTerm for SoleTerm {
    async fn lost(&mut self) {
        std::future::pending::<()>().await;
    }
}

#[async_trait]
impl LeaderElector for SoleLeader {
    async fn try_acquire(&self) -> Result<Option<Box<dyn LeaderTerm>>> {
        Ok(Some(Box::new(SoleTerm)))
    }
}
