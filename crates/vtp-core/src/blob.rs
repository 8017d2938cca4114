//! Object storage for datasets and checkpoints: the [`BlobStore`] trait.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};

/// A stream of byte chunks, the unit of every transfer.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// A parsed storage URI: `s3://bucket/key` or `file:///absolute/path`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BlobUri {
    /// An object or prefix in an S3-compatible bucket.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key or prefix inside the bucket, without a leading `/`; may be empty.
        key: String,
    },
    /// A file or directory on local disk.
    File {
        /// Absolute path.
        path: PathBuf,
    },
}

impl FromStr for BlobUri {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::invalid("uri", format!("{s:?} names no bucket")));
            }
            return Ok(BlobUri::S3 {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            });
        }
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(Error::invalid(
                    "uri",
                    format!("{s:?} must hold an absolute path (file:///...)"),
                ));
            }
            return Ok(BlobUri::File { path: path.into() });
        }
        Err(Error::invalid(
            "uri",
            format!("{s:?} must start with s3:// or file://"),
        ))
    }
}

impl fmt::Display for BlobUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobUri::S3 { bucket, key } if key.is_empty() => write!(f, "s3://{bucket}"),
            BlobUri::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
            BlobUri::File { path } => write!(f, "file://{}", path.display()),
        }
    }
}

/// A key inside a [`BlobStore`]: `/`-separated segments, none empty, `.` or
/// `..`, no control characters. Safe to join onto a local directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BlobKey(String);

impl BlobKey {
    /// Parses `key`, ignoring one leading and one trailing `/`.
    pub fn parse(key: &str) -> Result<Self> {
        let trimmed = key.strip_prefix('/').unwrap_or(key);
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        if trimmed.is_empty() {
            return Err(Error::invalid("key", "must not be empty"));
        }
        for segment in trimmed.split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(Error::invalid(
                    "key",
                    format!("{key:?} has an empty, '.' or '..' segment"),
                ));
            }
            if segment.chars().any(|c| c.is_control() || c == '\\') {
                return Err(Error::invalid(
                    "key",
                    format!("{key:?} holds a control character or backslash"),
                ));
            }
        }
        Ok(BlobKey(trimmed.to_owned()))
    }

    /// Joins segments with `/`, validating the result.
    pub fn from_segments<S: AsRef<str>>(segments: &[S]) -> Result<Self> {
        let joined = segments
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<_>>()
            .join("/");
        Self::parse(&joined)
    }

    /// `self/child`.
    pub fn join(&self, child: &str) -> Result<Self> {
        Self::parse(&format!("{}/{}", self.0, child))
    }

    /// The key as a string, without leading or trailing `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part of `self` below `prefix`, if `self` lies under it.
    pub fn strip_prefix(&self, prefix: &BlobKey) -> Option<&str> {
        if self == prefix {
            return Some("");
        }
        self.0
            .strip_prefix(prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
    }

    /// The last segment.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for BlobKey {
    type Error = Error;

    fn try_from(value: String) -> Result<Self> {
        Self::parse(&value)
    }
}

impl From<BlobKey> for String {
    fn from(value: BlobKey) -> Self {
        value.0
    }
}

/// What a store knows about one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// The object's key.
    pub key: BlobKey,
    /// Size in bytes.
    pub size: u64,
    /// When it was last written.
    pub last_modified: DateTime<Utc>,
    /// Entity tag, where the store has one.
    pub e_tag: Option<String>,
}

/// Object storage rooted at one base URI (a bucket, a bucket prefix, a directory).
///
/// Keys are relative to the root; [`BlobStoreExt::uri`] and
/// [`BlobStoreExt::key_for`] convert between keys and the `s3://` / `file://`
/// URIs that jobs and callbacks carry.
///
/// # Contract
/// - `put_stream` is all or nothing: after an error no object (and no partial
///   object) is visible under the key, and a previous object under it is
///   either intact or replaced whole. Large bodies are sent in parts; the
///   whole body is never held in memory.
/// - `list` returns every object under the prefix (recursively), sorted by key.
/// - `delete` of a missing key succeeds.
///
/// # Errors
/// - [`Error::NotFound`] for a missing object in `get_stream`, `head`, `copy`.
/// - [`Error::Unavailable`] when the store cannot be reached (retryable).
/// - [`Error::Backend`] for any other failure reported by the store.
/// - Errors of the input stream are returned as they are, after the upload is aborted.
#[async_trait]
pub trait BlobStore: Send + Sync + fmt::Debug + 'static {
    /// The URI of the root, without a trailing `/`: `s3://bucket/prefix`, `file:///dir`.
    fn base_uri(&self) -> &str;

    /// Writes the stream under `key`, in parts.
    async fn put_stream(&self, key: &BlobKey, data: ByteStream) -> Result<ObjectMeta>;

    /// Opens `key` for reading.
    async fn get_stream(&self, key: &BlobKey) -> Result<(ObjectMeta, ByteStream)>;

    /// Metadata of `key`.
    async fn head(&self, key: &BlobKey) -> Result<ObjectMeta>;

    /// Every object under `prefix` (the whole store when `None`), sorted by key.
    async fn list(&self, prefix: Option<&BlobKey>) -> Result<Vec<ObjectMeta>>;

    /// Copies `from` to `to` inside the store (server-side where possible).
    async fn copy(&self, from: &BlobKey, to: &BlobKey) -> Result<()>;

    /// Removes `key`; a missing key is not an error.
    async fn delete(&self, key: &BlobKey) -> Result<()>;
}

/// Conveniences built on [`BlobStore`], for every implementation.
#[async_trait]
pub trait BlobStoreExt: BlobStore {
    /// The full URI of `key`.
    fn uri(&self, key: &BlobKey) -> String {
        format!("{}/{}", self.base_uri(), key)
    }

    /// The key that `uri` names in this store; a trailing `/` (a prefix) is ignored.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the URI is malformed or points outside this store.
    fn key_for(&self, uri: &str) -> Result<BlobKey> {
        let parsed: BlobUri = uri.parse()?;
        let base = self.base_uri();
        let rest = parsed
            .to_string()
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix('/'))
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::invalid("uri", format!("{uri:?} is outside the store at {base}"))
            })?;
        BlobKey::parse(rest.trim_end_matches('/'))
    }

    /// Writes `data` under `key`.
    async fn put_bytes(&self, key: &BlobKey, data: Bytes) -> Result<ObjectMeta> {
        self.put_stream(key, futures::stream::once(async { Ok(data) }).boxed())
            .await
    }

    /// Reads the whole object (for small objects only).
    async fn get_bytes(&self, key: &BlobKey) -> Result<Bytes> {
        let (meta, stream) = self.get_stream(key).await?;
        let mut buf = Vec::with_capacity(usize::try_from(meta.size).unwrap_or(0));
        let mut stream = stream;
        while let Some(chunk) = stream.try_next().await? {
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.into())
    }

    /// Streams a local file into the store.
    async fn put_file(&self, key: &BlobKey, path: &Path) -> Result<ObjectMeta> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::invalid("path", format!("cannot open {}: {e}", path.display())))?;
        let stream = file_stream(file);
        self.put_stream(key, stream).await
    }

    /// Whether `key` is an object, or a prefix with at least one object under it.
    async fn exists(&self, key: &BlobKey) -> Result<bool> {
        match self.head(key).await {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(!self.list(Some(key)).await?.is_empty()),
            Err(e) => Err(e),
        }
    }

    /// Downloads every object under `prefix` into `dir`, keeping the relative
    /// layout; a single object is written as `dir/<file name>`. Returns the
    /// objects written.
    async fn download_prefix(&self, prefix: &BlobKey, dir: &Path) -> Result<Vec<PathBuf>> {
        let objects = match self.head(prefix).await {
            Ok(meta) => vec![meta],
            Err(Error::NotFound { .. }) => self.list(Some(prefix)).await?,
            Err(e) => return Err(e),
        };
        if objects.is_empty() {
            return Err(Error::not_found("prefix", self.uri(prefix)));
        }
        let jobs = objects.into_iter().map(|meta| {
            let relative = match meta.key.strip_prefix(prefix) {
                Some("") | None => meta.key.file_name().to_owned(),
                Some(rest) => rest.to_owned(),
            };
            // BlobKey segments are never `..` or absolute, so this stays inside `dir`.
            let target = dir.join(relative);
            async move {
                self.download_to(&meta.key, &target).await?;
                Ok::<_, Error>(target)
            }
        });
        futures::stream::iter(jobs)
            .buffer_unordered(DOWNLOAD_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Streams one object into a local file, creating parent directories.
    async fn download_to(&self, key: &BlobKey, target: &Path) -> Result<u64> {
        let io_err = |e: std::io::Error| Error::internal(format!("{}: {e}", target.display()));
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io_err)?;
        }
        let (_, mut stream) = self.get_stream(key).await?;
        let mut file = tokio::fs::File::create(target).await.map_err(io_err)?;
        let mut written = 0u64;
        while let Some(chunk) = stream.try_next().await? {
            file.write_all(&chunk).await.map_err(io_err)?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(io_err)?;
        Ok(written)
    }
}

impl<T: BlobStore + ?Sized> BlobStoreExt for T {}

/// How many objects [`BlobStoreExt::download_prefix`] fetches at once.
pub const DOWNLOAD_CONCURRENCY: usize = 16;

/// Size of the chunks read from local files.
const FILE_CHUNK: usize = 1 << 20;

fn file_stream(file: tokio::fs::File) -> ByteStream {
    tokio_util::io::ReaderStream::with_capacity(file, FILE_CHUNK)
        .map_err(|e| Error::internal(format!("reading local file: {e}")))
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_print() {
        let uri: BlobUri = "s3://datasets/test/my-dataset/".parse().unwrap();
        assert_eq!(
            uri,
            BlobUri::S3 {
                bucket: "datasets".into(),
                key: "test/my-dataset/".into()
            }
        );
        let file: BlobUri = "file:///tmp/x".parse().unwrap();
        assert_eq!(file.to_string(), "file:///tmp/x");
        assert!("http://x/y".parse::<BlobUri>().is_err());
        assert!("s3:///key".parse::<BlobUri>().is_err());
        assert!("file://relative/path".parse::<BlobUri>().is_err());
    }

    #[test]
    fn keys_refuse_escapes() {
        assert_eq!(BlobKey::parse("/a/b/").unwrap().as_str(), "a/b");
        for bad in ["", "/", "a/../b", "..", "a//b", "./a", "a/\u{0}", "a\\b"] {
            assert!(BlobKey::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn strip_prefix_respects_segments() {
        let key = BlobKey::parse("users/u/datasets/d/file.zip").unwrap();
        let prefix = BlobKey::parse("users/u/datasets/d").unwrap();
        assert_eq!(key.strip_prefix(&prefix), Some("file.zip"));
        let other = BlobKey::parse("users/u/datasets/d2").unwrap();
        assert_eq!(key.strip_prefix(&other), None);
        let partial = BlobKey::parse("users/u/data").unwrap();
        assert_eq!(key.strip_prefix(&partial), None);
    }
}
