//! The [`BlobStore`] conformance cases.
#![allow(missing_docs, clippy::missing_panics_doc)]

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use crate::Error;
use crate::blob::{BlobKey, BlobStore, BlobStoreExt};

type Store = Arc<dyn BlobStore>;

fn key(s: &str) -> BlobKey {
    BlobKey::parse(s).unwrap()
}

/// Deterministic, non-repeating test bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `data` as a stream of `chunk`-byte pieces.
pub fn chunked(data: Vec<u8>, chunk: usize) -> crate::ByteStream {
    let data = Bytes::from(data);
    let pieces: Vec<_> = (0..data.len())
        .step_by(chunk)
        .map(|start| Ok(data.slice(start..(start + chunk).min(data.len()))))
        .collect();
    futures::stream::iter(pieces).boxed()
}

/// `len` good bytes, then an error.
fn failing(len: usize) -> crate::ByteStream {
    chunked(pattern(len, 9), 256 * 1024)
        .chain(futures::stream::once(async {
            Err(Error::internal("client went away"))
        }))
        .boxed()
}

/// Every case, in order, each on a fresh store from `fresh`, printing one
/// line per case passed: the suite as one call, for a binary or an example
/// (a crate's tests use [`crate::blob_store_conformance!`], one test per
/// case). Panics on the first case that fails.
pub async fn run_all(fresh: impl Fn() -> Store) {
    macro_rules! cases {
        ($fresh:ident; $($case:ident),* $(,)?) => {$(
            $case($fresh()).await;
            println!("conformance: {} ok", stringify!($case));
        )*};
    }
    crate::__blob_store_cases!([cases] fresh;);
}

pub async fn put_then_get(store: Store) {
    let k = key("a/hello.txt");
    let meta = store
        .put_bytes(&k, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(meta.size, 5);
    assert_eq!(meta.key, k);
    assert_eq!(
        store.get_bytes(&k).await.unwrap(),
        Bytes::from_static(b"hello")
    );
    let head = store.head(&k).await.unwrap();
    assert_eq!(head.size, 5);
    store
        .put_bytes(&k, Bytes::from_static(b"bye"))
        .await
        .unwrap();
    assert_eq!(
        store.get_bytes(&k).await.unwrap(),
        Bytes::from_static(b"bye")
    );
}

pub async fn missing_object_is_not_found(store: Store) {
    let k = key("nope/missing.bin");
    assert!(matches!(store.head(&k).await, Err(Error::NotFound { .. })));
    assert!(matches!(
        store.get_stream(&k).await.map(|_| ()),
        Err(Error::NotFound { .. })
    ));
    assert!(!store.exists(&k).await.unwrap());
    store.delete(&k).await.unwrap();
}

pub async fn large_upload_streams_in_parts(store: Store) {
    let data = pattern(21 * 1024 * 1024 + 17, 1);
    let k = key("big/blob.bin");
    let meta = store
        .put_stream(&k, chunked(data.clone(), 64 * 1024))
        .await
        .unwrap();
    assert_eq!(meta.size, data.len() as u64);
    let (head, mut stream) = store.get_stream(&k).await.unwrap();
    assert_eq!(head.size, data.len() as u64);
    let mut read = Vec::with_capacity(data.len());
    while let Some(chunk) = stream.next().await {
        read.extend_from_slice(&chunk.unwrap());
    }
    assert!(read == data, "the object reads back byte-identical");
}

pub async fn failed_upload_leaves_nothing(store: Store) {
    let k = key("partial/upload.bin");
    let err = store
        .put_stream(&k, failing(6 * 1024 * 1024))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("client went away"), "{err}");
    assert!(matches!(store.head(&k).await, Err(Error::NotFound { .. })));
    assert!(store.list(Some(&key("partial"))).await.unwrap().is_empty());
}

pub async fn failed_overwrite_keeps_previous(store: Store) {
    let k = key("keep/me.bin");
    store
        .put_bytes(&k, Bytes::from_static(b"v1"))
        .await
        .unwrap();
    assert!(
        store
            .put_stream(&k, failing(6 * 1024 * 1024))
            .await
            .is_err()
    );
    assert_eq!(
        store.get_bytes(&k).await.unwrap(),
        Bytes::from_static(b"v1")
    );
}

pub async fn list_is_recursive_sorted_and_segment_aware(store: Store) {
    for k in ["ds/b.txt", "ds/a.txt", "ds/sub/c.txt", "dsx/other.txt"] {
        store
            .put_bytes(&key(k), Bytes::from(k.to_owned()))
            .await
            .unwrap();
    }
    let listed: Vec<_> = store
        .list(Some(&key("ds")))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key.to_string())
        .collect();
    assert_eq!(listed, vec!["ds/a.txt", "ds/b.txt", "ds/sub/c.txt"]);
    assert_eq!(store.list(None).await.unwrap().len(), 4);
    assert!(store.exists(&key("ds/sub")).await.unwrap());
    assert!(!store.exists(&key("d")).await.unwrap());
}

pub async fn copy_and_delete(store: Store) {
    let from = key("copy/src.bin");
    let to = key("copy/dst/dst.bin");
    store
        .put_bytes(&from, Bytes::from_static(b"payload"))
        .await
        .unwrap();
    store.copy(&from, &to).await.unwrap();
    assert_eq!(
        store.get_bytes(&to).await.unwrap(),
        Bytes::from_static(b"payload")
    );
    store.delete(&from).await.unwrap();
    assert!(matches!(
        store.head(&from).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        store.copy(&from, &to).await,
        Err(Error::NotFound { .. })
    ));
}

pub async fn uris_round_trip(store: Store) {
    let k = key("users/u/datasets/d/file.zip");
    let uri = store.uri(&k);
    assert!(
        uri.starts_with("s3://") || uri.starts_with("file:///"),
        "{uri}"
    );
    assert_eq!(store.key_for(&uri).unwrap(), k);
    let err = store
        .key_for("s3://some-other-bucket-xyz/elsewhere")
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    assert!(store.key_for("ftp://x/y").is_err());
}

pub async fn download_prefix_keeps_layout(store: Store) {
    for k in [
        "dl/train/cat/1.png",
        "dl/train/dog/2.png",
        "dl/val/cat/3.png",
    ] {
        store
            .put_bytes(&key(k), Bytes::from(k.to_owned()))
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut written = store.download_prefix(&key("dl"), dir.path()).await.unwrap();
    written.sort();
    assert_eq!(written.len(), 3);
    let cat = std::fs::read(dir.path().join("train/cat/1.png")).unwrap();
    assert_eq!(cat, b"dl/train/cat/1.png");
    let single = tempfile::tempdir().unwrap();
    store
        .download_prefix(&key("dl/val/cat/3.png"), single.path())
        .await
        .unwrap();
    assert!(single.path().join("3.png").exists());
    let err = store
        .download_prefix(&key("dl/nothing-here"), dir.path())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}
