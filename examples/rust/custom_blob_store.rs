//! A `BlobStore` of our own, checked by the conformance suite that every
//! store of VTP passes: here objects live in a `BTreeMap` behind a lock, the
//! shape of an adapter to a key-value store VTP does not ship.
//!
//! The suite's cases are plain async functions
//! (`vtp_core::conformance::blob_store`, with the `conformance` feature of
//! `vtp-core`); in a crate's own tests, `vtp_core::blob_store_conformance!`
//! turns them into one `#[tokio::test]` each.
//!
//! ```sh
//! cargo run -p vtp-examples --example custom_blob_store
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use vtp_core::conformance::blob_store as suite;
use vtp_core::{BlobKey, BlobStore, ByteStream, Error, ObjectMeta, Result};

/// Objects in memory, keyed by their path.
#[derive(Debug, Default)]
struct MapStore {
    objects: Mutex<BTreeMap<String, (ObjectMeta, Bytes)>>,
}

impl MapStore {
    fn object(&self, key: &BlobKey) -> Result<(ObjectMeta, Bytes)> {
        self.objects
            .lock()
            .expect("lock")
            .get(key.as_str())
            .cloned()
            .ok_or_else(|| Error::not_found("object", key))
    }
}

#[async_trait]
impl BlobStore for MapStore {
    fn base_uri(&self) -> &str {
        "s3://example-map-store"
    }

    async fn put_stream(&self, key: &BlobKey, data: ByteStream) -> Result<ObjectMeta> {
        // All or nothing: the object becomes visible only once the whole
        // stream has arrived; an error of the stream leaves the old one.
        let body = data
            .try_fold(BytesMut::new(), |mut body, chunk| async move {
                body.extend_from_slice(&chunk);
                Ok(body)
            })
            .await?
            .freeze();
        let meta = ObjectMeta {
            key: key.clone(),
            size: body.len() as u64,
            last_modified: chrono::Utc::now(),
            e_tag: None,
        };
        self.objects
            .lock()
            .expect("lock")
            .insert(key.as_str().to_owned(), (meta.clone(), body));
        Ok(meta)
    }

    async fn get_stream(&self, key: &BlobKey) -> Result<(ObjectMeta, ByteStream)> {
        let (meta, body) = self.object(key)?;
        Ok((meta, futures::stream::once(async { Ok(body) }).boxed()))
    }

    async fn head(&self, key: &BlobKey) -> Result<ObjectMeta> {
        Ok(self.object(key)?.0)
    }

    async fn list(&self, prefix: Option<&BlobKey>) -> Result<Vec<ObjectMeta>> {
        let objects = self.objects.lock().expect("lock");
        // Whole path segments only: `a/b` holds `a/b/c`, not `a/bc`.
        Ok(objects
            .values()
            .filter(|(meta, _)| prefix.is_none_or(|p| meta.key.strip_prefix(p).is_some()))
            .map(|(meta, _)| meta.clone())
            .collect())
    }

    async fn copy(&self, from: &BlobKey, to: &BlobKey) -> Result<()> {
        let (mut meta, body) = self.object(from)?;
        meta.key = to.clone();
        self.objects
            .lock()
            .expect("lock")
            .insert(to.as_str().to_owned(), (meta, body));
        Ok(())
    }

    async fn delete(&self, key: &BlobKey) -> Result<()> {
        self.objects.lock().expect("lock").remove(key.as_str());
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    suite::run_all(|| Arc::new(MapStore::default()) as Arc<dyn BlobStore>).await;
    println!("MapStore passes the BlobStore conformance suite");
}
