//! Fixtures for tests that run against real services: a fresh Postgres
//! database and a fresh S3 prefix per test.
//!
//! Where the services live comes from the environment:
//!
//! | variable | default |
//! |---|---|
//! | `VTP_TEST_DATABASE_URL` | `postgres://postgres@127.0.0.1:5432/postgres` |
//! | `VTP_TEST_S3_ENDPOINT` | none: S3 tests need it |
//! | `VTP_TEST_S3_BUCKET` | `vtp-test` |
//! | `VTP_TEST_S3_REGION` | `garage` |
//! | `VTP_TEST_S3_ACCESS_KEY_ID`, `VTP_TEST_S3_SECRET_ACCESS_KEY` | none |
//!
//! When a service is missing the fixture returns `None` and the test skips
//! with a message, unless `VTP_REQUIRE_SERVICES=1` (set by `scripts/test.sh`
//! and CI), in which case it panics: under CI a missing service is a failure.

use std::sync::Arc;

use sqlx::Connection;
use sqlx::postgres::PgConnection;
use vtp_core::BlobStore;

use crate::{BlobStoreBuilder, S3Settings};

/// Default admin URL of the local Postgres cluster.
pub const DEFAULT_TEST_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Prefix of every database [`TestDatabase`] creates.
pub const TEST_DATABASE_PREFIX: &str = "vtp_t_";

/// Whether missing services fail tests (`VTP_REQUIRE_SERVICES=1`).
pub fn services_required() -> bool {
    std::env::var("VTP_REQUIRE_SERVICES").is_ok_and(|v| v == "1" || v == "true")
}

/// Skips (returns `None`) or, when services are required, panics.
fn unavailable<T>(service: &str, why: &str) -> Option<T> {
    if services_required() {
        panic!("{service} is required (VTP_REQUIRE_SERVICES=1) but unavailable: {why}");
    }
    eprintln!("SKIPPED: {service} unavailable ({why}); run scripts/test.sh to start it");
    None
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A Postgres database created for one test and dropped after it.
#[derive(Debug)]
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates an empty database on the test cluster.
    ///
    /// # Panics
    /// When Postgres is unreachable and [`services_required`].
    pub async fn create() -> Option<Self> {
        let admin_url =
            var("VTP_TEST_DATABASE_URL").unwrap_or_else(|| DEFAULT_TEST_DATABASE_URL.to_owned());
        let mut admin = match PgConnection::connect(&admin_url).await {
            Ok(conn) => conn,
            Err(e) => return unavailable("Postgres", &format!("{admin_url}: {e}")),
        };
        let name = format!("{TEST_DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let create = format!("CREATE DATABASE {name}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(create))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let _ = admin.close().await;
        let mut url = url::Url::parse(&admin_url).expect("VTP_TEST_DATABASE_URL is a URL");
        url.set_path(&name);
        Some(TestDatabase {
            admin_url,
            name,
            url: url.to_string(),
        })
    }

    /// The URL of the test database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The admin URL of the cluster (the `postgres` database).
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop runs inside async tests; do the work on a thread of its own.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                    .execute(&mut admin)
                    .await
                    .ok()?;
                admin.close().await.ok()
            })
        });
        let _ = done.join();
    }
}

/// Connection settings of the test S3 store.
#[derive(Debug, Clone)]
pub struct TestS3 {
    /// Bucket the tests write to.
    pub bucket: String,
    /// Endpoint, region and keys.
    pub settings: S3Settings,
}

impl TestS3 {
    /// Reads the settings from the environment.
    ///
    /// # Panics
    /// When they are missing and [`services_required`].
    pub fn from_env() -> Option<Self> {
        let Some(endpoint) = var("VTP_TEST_S3_ENDPOINT") else {
            return unavailable("S3", "VTP_TEST_S3_ENDPOINT is not set");
        };
        let (Some(key_id), Some(secret)) = (
            var("VTP_TEST_S3_ACCESS_KEY_ID"),
            var("VTP_TEST_S3_SECRET_ACCESS_KEY"),
        ) else {
            return unavailable(
                "S3",
                "VTP_TEST_S3_ACCESS_KEY_ID / VTP_TEST_S3_SECRET_ACCESS_KEY are not set",
            );
        };
        Some(TestS3 {
            bucket: var("VTP_TEST_S3_BUCKET").unwrap_or_else(|| "vtp-test".to_owned()),
            settings: S3Settings {
                allow_http: endpoint.starts_with("http://"),
                endpoint: Some(endpoint),
                region: Some(var("VTP_TEST_S3_REGION").unwrap_or_else(|| "garage".to_owned())),
                access_key_id: Some(key_id),
                secret_access_key: Some(secret),
                virtual_hosted_style: false,
                ca_cert: None,
            },
        })
    }

    /// A fresh `s3://bucket/tests/<uuid>` URL, so tests never see each other's objects.
    pub fn fresh_url(&self) -> String {
        format!(
            "s3://{}/tests/{}",
            self.bucket,
            uuid::Uuid::new_v4().simple()
        )
    }

    /// A builder for a store rooted at [`TestS3::fresh_url`].
    pub fn builder(&self) -> BlobStoreBuilder {
        BlobStoreBuilder::new()
            .with_url(self.fresh_url())
            .with_s3(self.settings.clone())
    }

    /// A store rooted at a fresh prefix.
    ///
    /// # Panics
    /// When the settings do not build a store.
    pub fn fresh_store(&self) -> Arc<dyn BlobStore> {
        self.builder()
            .build()
            .expect("test S3 settings build a store")
    }

    /// The keys of the multipart uploads still open under the store rooted
    /// at `url` (an `s3://bucket/prefix` from [`TestS3::fresh_url`]): an
    /// upload that failed must have been aborted, or its parts stay in the
    /// bucket, invisible to a listing of objects.
    ///
    /// S3's `ListMultipartUploads`, which `object_store` does not expose,
    /// signed with its SigV4 authorizer.
    ///
    /// # Panics
    /// When the request fails or the answer is not a listing.
    pub async fn open_multipart_uploads(&self, url: &str) -> Vec<String> {
        use object_store::aws::{AwsAuthorizer, AwsCredential};
        let url = url::Url::parse(url).expect("an s3:// URL");
        let bucket = url.host_str().expect("a bucket");
        let prefix = url.path().trim_start_matches('/');
        let endpoint = self.settings.endpoint.as_deref().expect("an S3 endpoint");
        let mut request_url =
            url::Url::parse(&format!("{}/{bucket}", endpoint.trim_end_matches('/')))
                .expect("the endpoint is a URL");
        request_url
            .query_pairs_mut()
            .append_pair("prefix", prefix)
            .append_pair("uploads", "");
        let credential = AwsCredential {
            key_id: self.settings.access_key_id.clone().unwrap_or_default(),
            secret_key: self.settings.secret_access_key.clone().unwrap_or_default(),
            token: None,
        };
        let region = self.settings.region.clone().unwrap_or_default();
        let mut request = http::Request::builder()
            .method(http::Method::GET)
            .uri(request_url.as_str())
            .body(object_store::client::HttpRequestBody::empty())
            .expect("a valid request");
        AwsAuthorizer::new(&credential, "s3", &region)
            .try_authorize(&mut request, None)
            .expect("signing works");
        let mut send = reqwest::Client::new().get(request_url.as_str());
        for (name, value) in request.headers() {
            send = send.header(name, value);
        }
        let response = send.send().await.expect("S3 answers");
        let status = response.status();
        let body = response.text().await.expect("a listing");
        assert!(
            status.is_success(),
            "ListMultipartUploads: {status}: {body}"
        );
        body.split("<Upload>")
            .skip(1)
            .filter_map(|upload| {
                let key = upload.split_once("<Key>")?.1.split_once("</Key>")?.0;
                Some(key.to_owned())
            })
            .collect()
    }

    /// The variables a child process (the backend binary) needs to reach the
    /// same store, rooted at `url`.
    pub fn env_for(&self, url: &str) -> Vec<(&'static str, String)> {
        let s = &self.settings;
        vec![
            ("VTP_BLOB_URL", url.to_owned()),
            ("VTP_S3_ENDPOINT", s.endpoint.clone().unwrap_or_default()),
            ("VTP_S3_REGION", s.region.clone().unwrap_or_default()),
            (
                "VTP_S3_ACCESS_KEY_ID",
                s.access_key_id.clone().unwrap_or_default(),
            ),
            (
                "VTP_S3_SECRET_ACCESS_KEY",
                s.secret_access_key.clone().unwrap_or_default(),
            ),
            ("VTP_S3_ALLOW_HTTP", s.allow_http.to_string()),
        ]
    }
}
