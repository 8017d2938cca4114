//! The first step of a job's data path: its dataset and code, from the
//! blob store into the attempt's directory, archives unpacked and checked.

use std::path::{Path, PathBuf};

use vtp_core::{BlobKey, BlobStoreExt, Error, Result};

use super::TrainerService;
use crate::data::archive::{extract_archive_with, is_archive};

impl TrainerService {
    /// Turns a blob the request names but the store lacks into a bad
    /// `field` ("no {what} at {uri}"); other errors (an outage) stay.
    pub(super) fn missing_is_invalid<'a>(
        &'a self,
        key: &'a BlobKey,
        field: &'static str,
        what: &'static str,
    ) -> impl FnOnce(Error) -> Error + 'a {
        move |e| match e {
            Error::NotFound { .. } => {
                Error::invalid(field, format!("no {what} at {}", self.blobs.uri(key)))
            }
            other => other,
        }
    }

    /// Downloads the dataset and unpacks archives; returns the ImageFolder root.
    pub(super) async fn fetch_dataset(&self, key: &BlobKey, dir: &Path) -> Result<PathBuf> {
        let raw = dir.join("download");
        let _ = tokio::fs::remove_dir_all(&raw).await;
        let files = self
            .blobs
            .download_prefix(key, &raw)
            .await
            .map_err(self.missing_is_invalid(key, "dataset_s3_uri", "dataset"))?;
        match files.as_slice() {
            [single] if is_archive(single) => {
                let archive = single.clone();
                let target = dir.join("dataset");
                let limits = self.archive_limits;
                tokio::task::spawn_blocking(move || extract_archive_with(&archive, &target, limits))
                    .await
                    .map_err(|e| Error::internal(format!("extraction thread: {e}")))?
            }
            [single] => Err(Error::invalid(
                "dataset_s3_uri",
                format!(
                    "{} is a single file that is not a .zip, .tar or .tar.gz archive",
                    single.display()
                ),
            )),
            _ => Ok(raw),
        }
    }

    /// Downloads the job's code archive and unpacks it (with the dataset
    /// archives' limits); returns the directory the entrypoint is relative
    /// to: the archive's root, or the one folder that wraps it all (a
    /// zipped folder) when the entrypoint is there.
    pub(super) async fn fetch_code(
        &self,
        key: &BlobKey,
        entrypoint: &str,
        dir: &Path,
    ) -> Result<PathBuf> {
        let name = key.as_str().rsplit('/').next().unwrap_or("code");
        let archive = dir.join(format!("code-archive-{name}"));
        self.blobs
            .download_to(key, &archive)
            .await
            .map_err(self.missing_is_invalid(key, "config.code_s3_uri", "code archive"))?;
        if !is_archive(&archive) {
            return Err(Error::invalid(
                "config.code_s3_uri",
                format!(
                    "{} is not a .zip, .tar or .tar.gz archive",
                    self.blobs.uri(key)
                ),
            ));
        }
        let target = dir.join("code");
        let limits = self.archive_limits;
        let unpacked = target.clone();
        tokio::task::spawn_blocking(move || extract_archive_with(&archive, &target, limits))
            .await
            .map_err(|e| Error::internal(format!("extraction thread: {e}")))??;
        if unpacked.join(entrypoint).is_file() {
            return Ok(unpacked);
        }
        let mut folders = Vec::new();
        let mut entries = tokio::fs::read_dir(&unpacked)
            .await
            .map_err(|e| Error::internal(format!("{}: {e}", unpacked.display())))?;
        while let Ok(Some(entry)) = entries.next_entry().await {
            if !entry.file_name().to_string_lossy().starts_with('.') {
                folders.push(entry.path());
            }
        }
        Ok(match folders.as_slice() {
            [only] if only.join(entrypoint).is_file() => only.clone(),
            _ => unpacked,
        })
    }
}
