//! [`ObjectStoreBlobStore`]: every [`BlobStore`] on top of `object_store`
//! (S3-compatible stores, local disk, memory), and [`BlobStoreBuilder`].

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload, PutResult, UploadPart, WriteMultipart,
};
use vtp_core::{
    BackoffConfig, BlobKey, BlobStore, ByteStream, Error, ObjectMeta, Result, RetryConfig,
};

/// The embedded default: a directory under `./.vtp/`.
pub const DEFAULT_BLOB_URL: &str = "file://./.vtp/blobs";

/// A [`BlobStore`] over any [`ObjectStore`], rooted at one base URI.
#[derive(Debug, Clone)]
pub struct ObjectStoreBlobStore {
    store: Arc<dyn ObjectStore>,
    base_uri: String,
    part_size: usize,
    max_concurrency: usize,
}

impl ObjectStoreBlobStore {
    /// Default multipart part size: 8 MiB (S3 requires at least 5 MiB).
    pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
    /// Default number of parts in flight during an upload.
    pub const DEFAULT_MAX_CONCURRENCY: usize = 4;

    /// Wraps `store`, whose keys are relative to `base_uri`.
    pub fn new(store: Arc<dyn ObjectStore>, base_uri: impl Into<String>) -> Self {
        ObjectStoreBlobStore {
            store,
            base_uri: base_uri.into().trim_end_matches('/').to_owned(),
            part_size: Self::DEFAULT_PART_SIZE,
            max_concurrency: Self::DEFAULT_MAX_CONCURRENCY,
        }
    }

    /// A store in process memory. Its URIs use the made-up bucket `vtp-memory`.
    pub fn in_memory() -> Self {
        Self::new(
            Arc::new(object_store::memory::InMemory::new()),
            "s3://vtp-memory",
        )
    }

    /// A store in the local directory `dir` (created if missing).
    pub fn local(dir: &FsPath) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::invalid("blob_url", format!("cannot create {}: {e}", dir.display()))
        })?;
        let dir = dir
            .canonicalize()
            .map_err(|e| Error::invalid("blob_url", format!("{}: {e}", dir.display())))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(map_object_store)?;
        Ok(Self::new(Arc::new(fs), format!("file://{}", dir.display())))
    }

    /// Sets the multipart part size (at least 5 MiB for S3).
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes.max(1);
        self
    }

    fn path(key: &BlobKey) -> Path {
        Path::from(key.as_str())
    }

    async fn put_multipart(&self, path: &Path, first: Bytes, mut data: ByteStream) -> Result<()> {
        let upload = self
            .store
            .put_multipart(path)
            .await
            .map_err(map_object_store)?;
        let upload = SharedUpload(Arc::new(tokio::sync::Mutex::new(upload)));
        let handle = upload.0.clone();
        let mut writer = WriteMultipart::new_with_chunk_size(Box::new(upload), self.part_size);
        writer.put(first);
        let streamed: Result<()> = async {
            while let Some(chunk) = data.try_next().await? {
                writer
                    .wait_for_capacity(self.max_concurrency)
                    .await
                    .map_err(map_object_store)?;
                writer.put(chunk);
            }
            Ok(())
        }
        .await;
        let aborted = match streamed {
            // `finish` aborts the upload itself when a part or the
            // completion fails.
            Ok(()) => match writer.finish().await {
                Ok(_) => return Ok(()),
                Err(e) => return Err(abort_later(handle, path, map_object_store(e))),
            },
            Err(e) => (writer.abort().await, e),
        };
        match aborted {
            (Ok(()), e) => Err(e),
            (Err(_), e) => Err(abort_later(handle, path, e)),
        }
    }
}

/// The multipart upload behind a [`WriteMultipart`], shared with the
/// caller: when the abort fails (the store went away mid-upload), the
/// caller retries it later, so no upload is left open with its parts
/// billed and invisible.
#[derive(Debug)]
struct SharedUpload(Arc<tokio::sync::Mutex<Box<dyn MultipartUpload>>>);

#[async_trait]
impl MultipartUpload for SharedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        // Parts are put only by the writer, before it completes or
        // aborts; the retry below starts after the writer is gone.
        self.0
            .try_lock()
            .expect("parts are put only while nothing else holds the upload")
            .put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.0.lock().await.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.0.lock().await.abort().await
    }
}

/// Retries aborting `upload` in the background (the store was unreachable
/// when the upload failed), with backoff for up to ten minutes; answers
/// `error`, the upload's own failure. An upload that is already gone
/// (aborted or completed) counts as done.
fn abort_later(
    upload: Arc<tokio::sync::Mutex<Box<dyn MultipartUpload>>>,
    path: &Path,
    error: Error,
) -> Error {
    let path = path.clone();
    let retry = RetryConfig {
        max_retries: 30,
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            base: 2.0,
        },
        timeout: Duration::from_secs(600),
    };
    tokio::spawn(async move {
        let aborted = retry
            .run("abort a multipart upload", || async {
                match upload.lock().await.abort().await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(Error::unavailable("blob store", e)),
                }
            })
            .await;
        match aborted {
            Ok(()) => tracing::info!(path = %path, "aborted a failed multipart upload"),
            Err(e) => {
                tracing::warn!(path = %path, error = %e, "gave up aborting a multipart upload; a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes its parts")
            }
        }
    });
    error
}

#[async_trait]
impl BlobStore for ObjectStoreBlobStore {
    fn base_uri(&self) -> &str {
        &self.base_uri
    }

    async fn put_stream(&self, key: &BlobKey, mut data: ByteStream) -> Result<ObjectMeta> {
        let path = Self::path(key);
        // Small bodies go up in one request; larger ones switch to multipart
        // once a whole part is buffered, so memory stays at a few parts.
        let mut first = BytesMut::new();
        let mut ended = false;
        while first.len() < self.part_size {
            match data.try_next().await? {
                Some(chunk) => first.extend_from_slice(&chunk),
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            self.store
                .put(&path, PutPayload::from(first.freeze()))
                .await
                .map_err(map_object_store)?;
        } else {
            self.put_multipart(&path, first.freeze(), data).await?;
        }
        self.head(key).await
    }

    async fn get_stream(&self, key: &BlobKey) -> Result<(ObjectMeta, ByteStream)> {
        let result = self
            .store
            .get(&Self::path(key))
            .await
            .map_err(map_object_store)?;
        let meta = convert_meta(&result.meta)?;
        Ok((meta, result.into_stream().map_err(map_object_store).boxed()))
    }

    async fn head(&self, key: &BlobKey) -> Result<ObjectMeta> {
        let meta = self
            .store
            .head(&Self::path(key))
            .await
            .map_err(map_object_store)?;
        convert_meta(&meta)
    }

    async fn list(&self, prefix: Option<&BlobKey>) -> Result<Vec<ObjectMeta>> {
        let prefix = prefix.map(Self::path);
        let mut objects: Vec<ObjectMeta> = self
            .store
            .list(prefix.as_ref())
            .map_err(map_object_store)
            .and_then(|meta| futures::future::ready(convert_meta(&meta)))
            .try_collect()
            .await?;
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn copy(&self, from: &BlobKey, to: &BlobKey) -> Result<()> {
        self.store
            .copy(&Self::path(from), &Self::path(to))
            .await
            .map_err(map_object_store)
    }

    async fn delete(&self, key: &BlobKey) -> Result<()> {
        match self.store.delete(&Self::path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_object_store(e)),
        }
    }
}

fn convert_meta(meta: &object_store::ObjectMeta) -> Result<ObjectMeta> {
    Ok(ObjectMeta {
        key: BlobKey::parse(meta.location.as_ref())?,
        size: meta.size,
        last_modified: meta.last_modified,
        e_tag: meta.e_tag.clone(),
    })
}

/// Maps an `object_store` error to its category.
pub fn map_object_store(err: object_store::Error) -> Error {
    use object_store::Error as E;
    match err {
        E::NotFound { path, .. } => Error::not_found("object", path),
        E::AlreadyExists { path, .. } => Error::AlreadyExists {
            kind: "object",
            id: path,
        },
        E::Precondition { path, .. } | E::NotModified { path, .. } => {
            Error::conflict(format!("object {path} changed concurrently"))
        }
        E::InvalidPath { source } => Error::invalid("key", source.to_string()),
        other if is_transient(&other) => Error::unavailable("object store", other),
        other => Error::backend("object store", other),
    }
}

/// Whether the failure is the store being unreachable or overloaded.
fn is_transient(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        #[cfg(feature = "s3")]
        if let Some(http) = e.downcast_ref::<object_store::client::HttpError>() {
            use object_store::client::HttpErrorKind as K;
            return matches!(
                http.kind(),
                K::Connect | K::Request | K::Timeout | K::Interrupted
            );
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::TimedOut
                    | K::BrokenPipe
            );
        }
        let text = e.to_string();
        if [
            "status code: 500",
            "status code: 502",
            "status code: 503",
            "status code: 504",
        ]
        .iter()
        .any(|s| text.contains(s))
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The variables the blob store's settings are read from: by
/// [`BlobStoreBuilder::from_env`], and by the binaries' arguments (the
/// `cli` feature) as the `env` of each flag.
pub mod env {
    /// Where the store is rooted: `file://dir`, `s3://bucket[/prefix]`, `memory://`.
    pub const BLOB_URL: &str = "VTP_BLOB_URL";
    /// [`super::S3Settings::endpoint`].
    pub const S3_ENDPOINT: &str = "VTP_S3_ENDPOINT";
    /// [`super::S3Settings::region`].
    pub const S3_REGION: &str = "VTP_S3_REGION";
    /// [`super::S3Settings::access_key_id`].
    pub const S3_ACCESS_KEY_ID: &str = "VTP_S3_ACCESS_KEY_ID";
    /// [`super::S3Settings::secret_access_key`].
    pub const S3_SECRET_ACCESS_KEY: &str = "VTP_S3_SECRET_ACCESS_KEY";
    /// [`super::S3Settings::allow_http`].
    pub const S3_ALLOW_HTTP: &str = "VTP_S3_ALLOW_HTTP";
    /// [`super::S3Settings::virtual_hosted_style`].
    pub const S3_VIRTUAL_HOSTED_STYLE: &str = "VTP_S3_VIRTUAL_HOSTED_STYLE";
    /// [`super::S3Settings::ca_cert`].
    pub const CA_CERT: &str = vtp_core::tls::CA_CERT_ENV;
}

/// S3 connection settings. With the `cli` feature they are also the
/// binaries' S3 arguments (`#[command(flatten)]`), each with its `VTP_S3_*`
/// variable, so `--help` lists them; the secrets' values are never shown.
#[derive(Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[cfg_attr(
    feature = "cli",
    command(next_help_heading = "S3 blob store (for an s3:// blob URL)")
)]
pub struct S3Settings {
    /// Endpoint URL for a store other than AWS (`http://127.0.0.1:3900`
    /// for Garage).
    #[cfg_attr(feature = "cli", arg(long = "s3-endpoint", env = env::S3_ENDPOINT))]
    pub endpoint: Option<String>,
    /// Region (`garage` for Garage, `auto` for R2); `us-east-1` when unset.
    #[cfg_attr(feature = "cli", arg(long = "s3-region", env = env::S3_REGION))]
    pub region: Option<String>,
    /// Access key id.
    #[cfg_attr(
        feature = "cli",
        arg(long = "s3-access-key-id", env = env::S3_ACCESS_KEY_ID, hide_env_values = true)
    )]
    pub access_key_id: Option<String>,
    /// Secret access key (set the variable: a flag is visible to every
    /// user of the machine).
    #[cfg_attr(
        feature = "cli",
        arg(long = "s3-secret-access-key", env = env::S3_SECRET_ACCESS_KEY, hide_env_values = true)
    )]
    pub secret_access_key: Option<String>,
    /// Allow a plain `http://` endpoint.
    #[cfg_attr(
        feature = "cli",
        arg(
            long = "s3-allow-http",
            env = env::S3_ALLOW_HTTP,
            action = clap::ArgAction::Set,
            value_parser = clap::builder::BoolishValueParser::new(),
            num_args = 0..=1,
            default_value = "false",
            default_missing_value = "true",
        )
    )]
    pub allow_http: bool,
    /// Use `bucket.host` URLs instead of `host/bucket` (path style, the default).
    #[cfg_attr(
        feature = "cli",
        arg(
            long = "s3-virtual-hosted-style",
            env = env::S3_VIRTUAL_HOSTED_STYLE,
            action = clap::ArgAction::Set,
            value_parser = clap::builder::BoolishValueParser::new(),
            num_args = 0..=1,
            default_value = "false",
            default_missing_value = "true",
        )
    )]
    pub virtual_hosted_style: bool,
    /// A PEM bundle of CAs to trust for an `https://` endpoint besides the
    /// system's roots: a store whose certificate a private CA signed.
    #[cfg_attr(feature = "cli", arg(long = "ca-cert", env = env::CA_CERT))]
    pub ca_cert: Option<std::path::PathBuf>,
}

impl S3Settings {
    /// The settings that are not secret, as the variables a trainer reads
    /// them from (what a Kubernetes trainer pod gets in plain environment;
    /// the credentials travel in a Secret).
    pub fn public_env(&self) -> Vec<(String, String)> {
        let flag = |on: bool| on.then(|| "true".to_owned());
        [
            (env::S3_ENDPOINT, self.endpoint.clone()),
            (env::S3_REGION, self.region.clone()),
            (env::S3_ALLOW_HTTP, flag(self.allow_http)),
            (
                env::S3_VIRTUAL_HOSTED_STYLE,
                flag(self.virtual_hosted_style),
            ),
            (
                env::CA_CERT,
                self.ca_cert.as_ref().map(|p| p.display().to_string()),
            ),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name.to_owned(), v)))
        .collect()
    }
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("ca_cert", &self.ca_cert)
            .finish()
    }
}

/// Builds a [`BlobStore`] from a URL: `file://dir` (relative paths allowed),
/// `s3://bucket[/prefix]` or `memory://`.
///
/// ```no_run
/// # fn demo() -> vtp_core::Result<()> {
/// use vtp_storage::BlobStoreBuilder;
/// let store = BlobStoreBuilder::new()
///     .with_url("s3://vtp/datasets")
///     .with_s3_endpoint("http://127.0.0.1:3900")
///     .with_s3_region("garage")
///     .with_s3_credentials("GK...", "secret")
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct BlobStoreBuilder {
    url: String,
    s3: S3Settings,
    part_size: usize,
}

impl Default for BlobStoreBuilder {
    fn default() -> Self {
        BlobStoreBuilder {
            url: DEFAULT_BLOB_URL.to_owned(),
            s3: S3Settings::default(),
            part_size: ObjectStoreBlobStore::DEFAULT_PART_SIZE,
        }
    }
}

impl BlobStoreBuilder {
    /// The embedded default, `file://./.vtp/blobs`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `VTP_BLOB_URL`, `VTP_S3_ENDPOINT`, `VTP_S3_REGION`,
    /// `VTP_S3_ACCESS_KEY_ID`, `VTP_S3_SECRET_ACCESS_KEY`, `VTP_S3_ALLOW_HTTP`
    /// `VTP_S3_VIRTUAL_HOSTED_STYLE` and `VTP_CA_CERT` over the defaults.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let flag =
            |name: &str| var(name).is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes"));
        let mut builder = Self::new();
        if let Some(url) = var(env::BLOB_URL) {
            builder.url = url;
        }
        builder.s3 = S3Settings {
            endpoint: var(env::S3_ENDPOINT),
            region: var(env::S3_REGION),
            access_key_id: var(env::S3_ACCESS_KEY_ID),
            secret_access_key: var(env::S3_SECRET_ACCESS_KEY),
            allow_http: flag(env::S3_ALLOW_HTTP),
            virtual_hosted_style: flag(env::S3_VIRTUAL_HOSTED_STYLE),
            ca_cert: var(env::CA_CERT).map(Into::into),
        };
        builder
    }

    /// Where the store is rooted.
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// All S3 settings at once.
    pub fn with_s3(mut self, settings: S3Settings) -> Self {
        self.s3 = settings;
        self
    }

    /// The S3 endpoint; an `http://` endpoint also allows plain HTTP.
    pub fn with_s3_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        let endpoint = endpoint.into();
        self.s3.allow_http |= endpoint.starts_with("http://");
        self.s3.endpoint = Some(endpoint);
        self
    }

    /// The S3 region.
    pub fn with_s3_region(mut self, region: impl Into<String>) -> Self {
        self.s3.region = Some(region.into());
        self
    }

    /// Static S3 credentials.
    pub fn with_s3_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret: impl Into<String>,
    ) -> Self {
        self.s3.access_key_id = Some(access_key_id.into());
        self.s3.secret_access_key = Some(secret.into());
        self
    }

    /// Trusts the CAs of a PEM bundle for an `https://` S3 endpoint, besides
    /// the system's roots.
    pub fn with_ca_cert(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.s3.ca_cert = Some(path.into());
        self
    }

    /// Multipart part size.
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes;
        self
    }

    /// Validates the settings and builds the store.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the bad setting.
    pub fn build(self) -> Result<Arc<dyn BlobStore>> {
        let store = if self.url == "memory://" || self.url == "memory:" {
            ObjectStoreBlobStore::in_memory()
        } else if let Some(path) = self.url.strip_prefix("file://") {
            let dir = PathBuf::from(path);
            ObjectStoreBlobStore::local(&dir)?
        } else if self.url.starts_with("s3://") {
            self.build_s3()?
        } else {
            return Err(Error::invalid(
                "blob_url",
                format!(
                    "unsupported blob URL {:?}: use file://, s3:// or memory://",
                    self.url
                ),
            ));
        };
        Ok(Arc::new(store.with_part_size(self.part_size)))
    }

    #[cfg(feature = "s3")]
    fn build_s3(&self) -> Result<ObjectStoreBlobStore> {
        use object_store::aws::AmazonS3Builder;
        use vtp_core::BlobUri;
        let BlobUri::S3 { bucket, key } = self
            .url
            .parse::<BlobUri>()
            .map_err(|e| Error::invalid("blob_url", e.to_string()))?
        else {
            return Err(Error::invalid("blob_url", "expected s3://bucket[/prefix]"));
        };
        let mut builder = AmazonS3Builder::from_env();
        if let Some(path) = &self.s3.ca_cert {
            let pem = vtp_core::tls::read_ca_bundle(vtp_core::tls::CA_CERT_ENV, path)?;
            let certs = object_store::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::invalid(vtp_core::tls::CA_CERT_ENV, e.to_string()))?;
            // object_store has no way to add to the options `from_env` read,
            // only to replace them: set before the settings below, which go
            // into the same options. (VTP's S3 settings are the VTP_S3_*
            // variables; no AWS_* client option is documented.)
            let options = certs
                .into_iter()
                .fold(object_store::ClientOptions::new(), |o, cert| {
                    o.with_root_certificate(cert)
                });
            builder = builder.with_client_options(options);
        }
        let mut builder = builder
            .with_bucket_name(&bucket)
            .with_region(self.s3.region.as_deref().unwrap_or("us-east-1"))
            .with_allow_http(self.s3.allow_http)
            .with_virtual_hosted_style_request(self.s3.virtual_hosted_style)
            .with_retry(object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(30),
                ..Default::default()
            });
        if let Some(endpoint) = &self.s3.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let (Some(id), Some(secret)) = (&self.s3.access_key_id, &self.s3.secret_access_key) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        let s3: Arc<dyn ObjectStore> = Arc::new(
            builder
                .build()
                .map_err(|e| Error::invalid("s3", e.to_string()))?,
        );
        let prefix = key.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            s3
        } else {
            BlobKey::parse(prefix)?;
            Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
        };
        let base = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        Ok(ObjectStoreBlobStore::new(store, base))
    }

    #[cfg(not(feature = "s3"))]
    fn build_s3(&self) -> Result<ObjectStoreBlobStore> {
        Err(Error::invalid(
            "blob_url",
            "this build has no S3 support (feature `s3`)",
        ))
    }
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Args {
        #[command(flatten)]
        s3: S3Settings,
    }

    #[test]
    fn the_s3_arguments_are_the_variables_from_env_reads() {
        let args = Args::try_parse_from([
            "vtp",
            "--s3-endpoint",
            "http://127.0.0.1:3900",
            "--s3-region=garage",
            "--s3-allow-http",
            "--s3-virtual-hosted-style=no",
        ])
        .unwrap();
        assert_eq!(args.s3.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(args.s3.region.as_deref(), Some("garage"));
        assert!(args.s3.allow_http);
        assert!(!args.s3.virtual_hosted_style);
        assert_eq!(
            args.s3.public_env(),
            [
                (
                    "VTP_S3_ENDPOINT".to_owned(),
                    "http://127.0.0.1:3900".to_owned()
                ),
                ("VTP_S3_REGION".to_owned(), "garage".to_owned()),
                ("VTP_S3_ALLOW_HTTP".to_owned(), "true".to_owned()),
            ]
        );

        let command = Args::command();
        let documented: Vec<&str> = command
            .get_arguments()
            .filter_map(|a| a.get_env()?.to_str())
            .collect();
        for name in [
            env::S3_ENDPOINT,
            env::S3_REGION,
            env::S3_ACCESS_KEY_ID,
            env::S3_SECRET_ACCESS_KEY,
            env::S3_ALLOW_HTTP,
            env::S3_VIRTUAL_HOSTED_STYLE,
            env::CA_CERT,
        ] {
            assert!(
                documented.contains(&name),
                "{name} is not an argument's variable"
            );
        }
        // The credentials' values never show in --help.
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            assert_eq!(
                arg.is_hide_env_values_set(),
                id.contains("key"),
                "{id}: hide_env_values"
            );
        }
    }
}
