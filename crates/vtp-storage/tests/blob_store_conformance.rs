//! The BlobStore conformance suite against every implementation:
//! local disk, in memory, and S3 (Garage under `scripts/test.sh`).

use std::sync::Arc;

use vtp_core::BlobStore;
use vtp_storage::ObjectStoreBlobStore;

/// Small parts, so the multipart cases run with several parts on little data.
const PART: usize = 5 * 1024 * 1024;

mod local {
    use super::*;

    async fn store() -> Option<(Arc<dyn BlobStore>, tempfile::TempDir)> {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStoreBlobStore::local(dir.path())
            .unwrap()
            .with_part_size(PART);
        Some((Arc::new(store), dir))
    }
    vtp_core::blob_store_conformance!(store);
}

mod memory {
    use super::*;

    async fn store() -> Option<(Arc<dyn BlobStore>, ())> {
        Some((
            Arc::new(ObjectStoreBlobStore::in_memory().with_part_size(PART)),
            (),
        ))
    }
    vtp_core::blob_store_conformance!(store);
}

mod s3 {
    use super::*;
    use vtp_storage::testing::TestS3;

    async fn store() -> Option<(Arc<dyn BlobStore>, ())> {
        let s3 = TestS3::from_env()?;
        Some((s3.builder().with_part_size(PART).build().unwrap(), ()))
    }
    vtp_core::blob_store_conformance!(store);
}

/// URLs pick the store; bad URLs and bad settings name the setting.
#[test]
fn builder_validates_urls() {
    let dir = tempfile::tempdir().unwrap();
    let store = vtp_storage::BlobStoreBuilder::new()
        .with_url(format!("file://{}", dir.path().display()))
        .build()
        .unwrap();
    assert!(
        store.base_uri().starts_with("file://"),
        "{}",
        store.base_uri()
    );

    let store = vtp_storage::BlobStoreBuilder::new()
        .with_url("memory://")
        .build()
        .unwrap();
    assert!(
        store.base_uri().starts_with("s3://"),
        "{}",
        store.base_uri()
    );

    for bad in ["ftp://host/x", "bucket/key", "s3://"] {
        let err = vtp_storage::BlobStoreBuilder::new()
            .with_url(bad)
            .build()
            .unwrap_err();
        assert!(
            matches!(err, vtp_core::Error::InvalidInput { .. }),
            "{bad}: {err:?}"
        );
    }
}
