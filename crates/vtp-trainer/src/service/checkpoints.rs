//! Checkpoint sets in the blob store, what a relaunched attempt resumes from.
//!
//! After every epoch the trainer stores what resuming needs (the output
//! directory's `last.*`, and `best.*` once there is one) under
//! `jobs/{id}/epochs/{epoch}/`, checks that each file arrived whole (its
//! size, by a HEAD), and writes `manifest.json` (every file's size and
//! SHA-256) last: a set is complete, and is reported to the backend as the
//! job's `last_checkpoint_s3_uri`, only once its manifest is stored. The
//! trainer never deletes a set: only the backend knows which one it has
//! recorded, and it prunes the older ones when it records a newer one.
//!
//! A relaunched attempt [`restore_set`]s the set its job records into an
//! empty output directory and checks every file against the manifest before
//! the engine resumes from it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vtp_core::{BlobKey, BlobStore, BlobStoreExt, Error, JobId, Result};

use crate::digest::sha256_file;

/// The manifest's name inside a set.
pub const MANIFEST: &str = "manifest.json";
/// The weights a set of the engine's is named by (its
/// `last_checkpoint_s3_uri`). A script's set is named by its own main
/// `last.*` file ([`main_file`]).
pub const LAST_WEIGHTS: &str = "last.safetensors";

/// The file among `names` a set (`role` `last`) or a finished job (`best`)
/// is named by: `{role}.safetensors` where there is one (the engine's),
/// else the first `{role}.*` by name that is not a JSON sidecar (a
/// script's checkpoint of one file, or the first of several: the package
/// engine's `weights.pt` before the `weights.json` of the weights it also
/// stores as safetensors), else the first sidecar.
pub fn main_file<'a>(
    names: impl IntoIterator<Item = &'a String>,
    role: &str,
) -> Option<&'a String> {
    let prefix = format!("{role}.");
    let preferred = format!("{role}.safetensors");
    let mut candidates: Vec<&String> = names
        .into_iter()
        .filter(|name| name.starts_with(&prefix) && name.len() > prefix.len())
        .collect();
    candidates.sort_by_key(|name| (**name != preferred, name.ends_with(".json"), *name));
    candidates.first().copied()
}

/// What a set holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The epoch the set was saved after.
    pub epoch: u32,
    /// File name to size and digest.
    pub files: BTreeMap<String, FileEntry>,
    /// That epoch's metrics, reported again by the attempt that resumes
    /// from the set: its first report may never have reached the backend
    /// (a pod evicted with its outbox).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// One file of a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Bytes.
    pub size: u64,
    /// Hex SHA-256.
    pub sha256: String,
}

/// Uploads `path` to `key` and checks the size the store reports for it
/// (`put_file` answers with the stored object's metadata) against `size`:
/// an upload is done only once the store holds all of it.
///
/// # Errors
/// Blob store errors; [`Error::Unavailable`] (retryable) for a short write.
pub(crate) async fn put_file_checked(
    blobs: &dyn BlobStore,
    key: &BlobKey,
    path: &Path,
    size: u64,
) -> Result<()> {
    let stored = blobs.put_file(key, path).await?;
    if stored.size != size {
        return Err(Error::unavailable(
            "blob store",
            format!(
                "{} holds {} bytes after uploading {size} of {}",
                blobs.uri(key),
                stored.size,
                path.display()
            ),
        ));
    }
    Ok(())
}

/// The checkpoint files in `output`: every regular file not starting with
/// a dot (`last.*`, `best.*`).
fn set_files(output: &Path) -> Result<Vec<(String, PathBuf)>> {
    let io = |e: std::io::Error| Error::internal(format!("{}: {e}", output.display()));
    let mut files = Vec::new();
    for entry in std::fs::read_dir(output).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.file_type().map_err(io)?.is_file() {
            files.push((name, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Stores the checkpoint files of `output` as the set of `epoch` (with its
/// `metrics`), each
/// checked after upload, the manifest last. Returns the URI of the set's
/// `last.safetensors`.
///
/// # Errors
/// Blob store errors; [`Error::Unavailable`] when an upload's stored size
/// differs from the file's.
pub async fn store_set(
    blobs: &dyn BlobStore,
    job_id: JobId,
    epoch: u32,
    metrics: &BTreeMap<String, f64>,
    output: &Path,
) -> Result<String> {
    let prefix = vtp_core::checkpoint_set_prefix(job_id, epoch)?;
    let files = {
        let output = output.to_path_buf();
        tokio::task::spawn_blocking(move || -> Result<Vec<(String, PathBuf, FileEntry)>> {
            set_files(&output)?
                .into_iter()
                .map(|(name, path)| {
                    let size = std::fs::metadata(&path)
                        .map_err(|e| Error::internal(format!("{}: {e}", path.display())))?
                        .len();
                    let sha256 = sha256_file(&path)?;
                    Ok((name, path, FileEntry { size, sha256 }))
                })
                .collect()
        })
        .await
        .map_err(|e| Error::internal(format!("hashing thread: {e}")))??
    };
    let names: Vec<String> = files.iter().map(|(name, ..)| name.clone()).collect();
    let Some(last) = main_file(&names, "last").cloned() else {
        return Err(Error::internal(format!(
            "{} holds no last.* checkpoint",
            output.display()
        )));
    };
    let mut manifest = Manifest {
        epoch,
        files: BTreeMap::new(),
        metrics: metrics.clone(),
    };
    for (name, path, entry) in files {
        put_file_checked(blobs, &prefix.join(&name)?, &path, entry.size).await?;
        manifest.files.insert(name, entry);
    }
    let body = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::internal(e.to_string()))?;
    blobs
        .put_bytes(&prefix.join(MANIFEST)?, body.into())
        .await?;
    Ok(blobs.uri(&prefix.join(&last)?))
}

/// The `last.safetensors` URI of the newest complete set of `job_id` (the
/// highest epoch whose manifest is stored), if any: a trainer that replaces
/// an interrupted one of the same attempt (a Kubernetes pod re-created after
/// an eviction) resumes from it, though its start request names an older one.
///
/// # Errors
/// Blob store errors.
pub async fn newest_set(blobs: &dyn BlobStore, job_id: JobId) -> Result<Option<String>> {
    let objects = blobs
        .list(Some(&vtp_core::checkpoint_sets_prefix(job_id)?))
        .await?;
    let newest = objects
        .iter()
        .filter(|object| object.key.as_str().ends_with(&format!("/{MANIFEST}")))
        .filter_map(|object| vtp_core::checkpoint_set_epoch(job_id, &object.key))
        .max();
    let Some(epoch) = newest else {
        return Ok(None);
    };
    let prefix = vtp_core::checkpoint_set_prefix(job_id, epoch)?;
    let inside = format!("{}/", prefix.as_str());
    let names: Vec<String> = objects
        .iter()
        .filter_map(|object| object.key.as_str().strip_prefix(&inside))
        .map(str::to_owned)
        .collect();
    main_file(&names, "last")
        .map(|last| Ok(blobs.uri(&prefix.join(last)?)))
        .transpose()
}

/// Downloads the set whose `last.safetensors` is at `last_uri` into
/// `output` (emptied first) and checks every file's size and SHA-256
/// against the manifest. Returns the manifest.
///
/// # Errors
/// [`Error::InvalidInput`] naming `resume_from` when the URI is not a set of
/// this job or a file does not match; blob store errors otherwise.
pub async fn restore_set(
    blobs: &dyn BlobStore,
    job_id: JobId,
    last_uri: &str,
    output: &Path,
) -> Result<Manifest> {
    let restored = restore_into(blobs, job_id, last_uri, output).await;
    if restored.is_err() {
        // Half a set is worse than none: the engine would resume from it.
        let _ = tokio::fs::remove_dir_all(output).await;
    }
    restored
}

async fn restore_into(
    blobs: &dyn BlobStore,
    job_id: JobId,
    last_uri: &str,
    output: &Path,
) -> Result<Manifest> {
    let invalid = |message: String| Error::invalid("resume_from", message);
    let key = blobs
        .key_for(last_uri)
        .map_err(|e| invalid(e.to_string()))?;
    let (dir, last) = key
        .as_str()
        .rsplit_once('/')
        .filter(|(_, name)| name.starts_with("last."))
        .ok_or_else(|| invalid(format!("{last_uri} is not a set's last.* file")))?;
    let dir = BlobKey::parse(dir)?;
    if vtp_core::checkpoint_set_epoch(job_id, &dir).is_none() {
        return Err(invalid(format!(
            "{last_uri} is not a checkpoint set of job {job_id}"
        )));
    }
    let manifest: Manifest = serde_json::from_slice(&blobs.get_bytes(&dir.join(MANIFEST)?).await?)
        .map_err(|e| invalid(format!("{MANIFEST} of {last_uri}: {e}")))?;
    if !manifest.files.contains_key(last) {
        return Err(invalid(format!("{MANIFEST} of {last_uri} lists no {last}")));
    }
    let _ = tokio::fs::remove_dir_all(output).await;
    tokio::fs::create_dir_all(output)
        .await
        .map_err(|e| Error::internal(format!("{}: {e}", output.display())))?;
    for (name, expected) in &manifest.files {
        // Names come from the store: only plain file names are written.
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(invalid(format!(
                "{MANIFEST} names {name:?}, not a file name"
            )));
        }
        let target = output.join(name);
        blobs.download_to(&dir.join(name)?, &target).await?;
        let path = target.clone();
        let sha256 = tokio::task::spawn_blocking(move || sha256_file(&path))
            .await
            .map_err(|e| Error::internal(format!("hashing thread: {e}")))??;
        let size = tokio::fs::metadata(&target)
            .await
            .map_err(|e| Error::internal(format!("{}: {e}", target.display())))?
            .len();
        if size != expected.size || sha256 != expected.sha256 {
            return Err(invalid(format!(
                "{name} of the stored checkpoint set does not match its manifest \
                 ({size} bytes, sha256 {sha256}; expected {} bytes, sha256 {})",
                expected.size, expected.sha256
            )));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_set_is_named_by_its_weights_not_its_sidecar() {
        let engine = names(&["last.json", "last.optim.safetensors", "last.safetensors"]);
        assert_eq!(main_file(&engine, "last").unwrap(), "last.safetensors");
        // The package engine's set: the package's file, then VTP's weights
        // of the same epoch with their sidecar.
        let package = names(&[
            "best.weights.json",
            "best.weights.pt",
            "best.weights.safetensors",
            "last.weights.json",
            "last.weights.pt",
        ]);
        assert_eq!(main_file(&package, "best").unwrap(), "best.weights.pt");
        assert_eq!(main_file(&package, "last").unwrap(), "last.weights.pt");
        let sidecar_only = names(&["last.b.json", "last.a.json"]);
        assert_eq!(main_file(&sidecar_only, "last").unwrap(), "last.a.json");
        assert_eq!(main_file(&names(&["last."]), "last"), None);
        assert_eq!(main_file(&engine, "best"), None);
    }
}
