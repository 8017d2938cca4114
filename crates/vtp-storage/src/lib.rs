//! # vtp-storage
//!
//! The storage backends of VTP:
//!
//! - job stores: [`SqliteJobStore`] (the embedded default) and
//!   [`PostgresJobStore`], both the one [`SqlJobStore`] on its
//!   [`Dialect`], and [`InMemoryJobStore`], picked by URL with
//!   [`connect_job_store`];
//! - blob stores: [`ObjectStoreBlobStore`] on S3-compatible stores, local disk
//!   or memory, built by URL with [`BlobStoreBuilder`].
//!
//! ```no_run
//! # async fn demo() -> vtp_core::Result<()> {
//! use vtp_core::{BlobKey, BlobStoreExt, JobStoreExt};
//!
//! // Embedded defaults: SQLite under ./.vtp/ and local disk.
//! let jobs = vtp_storage::connect_job_store(vtp_storage::DEFAULT_DATABASE_URL).await?;
//! let blobs = vtp_storage::BlobStoreBuilder::new().build()?;
//! let key = BlobKey::parse("users/alice/datasets/digits/digits.zip")?;
//! blobs.put_file(&key, std::path::Path::new("digits.zip")).await?;
//! println!("dataset at {}", blobs.uri(&key));
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod blob_store;
pub mod job_store;
#[cfg(feature = "testing")]
pub mod testing;

pub use blob_store::{
    BlobStoreBuilder, DEFAULT_BLOB_URL, ObjectStoreBlobStore, S3Settings, map_object_store,
};
pub use job_store::memory::InMemoryJobStore;
#[cfg(feature = "postgres")]
pub use job_store::postgres::{PostgresJobStore, PostgresLeaderElector};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use job_store::sql::{Dialect, SqlJobStore};
#[cfg(feature = "sqlite")]
pub use job_store::sqlite::SqliteJobStore;
pub use job_store::{DEFAULT_DATABASE_URL, Stores, connect as connect_job_store, connect_stores};
