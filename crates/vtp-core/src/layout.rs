//! Where VTP keeps things in its blob store: every key layout, in one place.
//!
//! - `users/{owner}/datasets/{name}/{file}`: an uploaded dataset;
//! - `users/{owner}/code/{name}/{file}`: an uploaded code archive;
//! - `jobs/{id}/{file}`: a job's published checkpoint (its weights and
//!   sidecar, `best.*` and `last.*`);
//! - `jobs/{id}/epochs/{epoch:06}/{file}`: a job's checkpoint set of one
//!   epoch, written by the trainer and pruned by the backend;
//! - `uploads/tmp/{uuid}`: an upload while it streams in, before it is
//!   checked and copied to its place (the backend's sweeper removes what a
//!   crash left).
//!
//! The backend, the trainer and the tests build keys here and ask here
//! whether a key lies where it must (an owner's upload, a job's own
//! checkpoint), so a layout is spelled once.

use crate::{BlobKey, Error, JobId, Result};

/// `value` when it is one key segment (no `/`), so that a name cannot
/// reach into another layout.
fn segment<'a>(field: &str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() || value.contains('/') {
        return Err(Error::invalid(
            field,
            format!("{value:?} must be one key segment (no '/')"),
        ));
    }
    Ok(value)
}

/// What an upload holds: the folder under `users/{owner}/` it is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// A dataset archive (`POST /datasets/upload`).
    Dataset,
    /// A code archive for `python` jobs (`POST /code/upload`).
    Code,
}

impl Upload {
    /// The folder's name: `datasets` or `code`.
    pub fn dir(self) -> &'static str {
        match self {
            Upload::Dataset => "datasets",
            Upload::Code => "code",
        }
    }
}

/// `users/{owner}`: everything an owner uploaded.
///
/// # Errors
/// [`crate::Error::InvalidInput`] for an owner that is not one key segment.
pub fn user_prefix(owner: &str) -> Result<BlobKey> {
    BlobKey::from_segments(&["users", segment("user_id", owner)?])
}

/// `users/{owner}/{datasets|code}`: an owner's uploads of one kind.
///
/// # Errors
/// As [`user_prefix`].
pub fn uploads_prefix(owner: &str, kind: Upload) -> Result<BlobKey> {
    user_prefix(owner)?.join(kind.dir())
}

/// `users/{owner}/{datasets|code}/{name}`: one named upload's objects.
///
/// # Errors
/// [`crate::Error::InvalidInput`] for an owner or name that is not one key
/// segment.
pub fn upload_prefix(owner: &str, kind: Upload, name: &str) -> Result<BlobKey> {
    uploads_prefix(owner, kind)?.join(segment("name", name)?)
}

/// `users/{owner}/{datasets|code}/{name}/{file}`: where an upload is stored.
///
/// # Errors
/// As [`upload_prefix`], and for a file name that is not one segment.
pub fn upload_key(owner: &str, kind: Upload, name: &str, file: &str) -> Result<BlobKey> {
    upload_prefix(owner, kind, name)?.join(segment("filename", file)?)
}

/// `uploads/tmp`: uploads while they stream in.
pub fn staging_prefix() -> BlobKey {
    BlobKey::from_segments(&["uploads", "tmp"]).expect("a literal key")
}

/// A fresh key under [`staging_prefix`] for one upload.
pub fn staging_key() -> BlobKey {
    staging_prefix()
        .join(&uuid::Uuid::new_v4().to_string())
        .expect("a UUID is one key segment")
}

/// `jobs/{id}`: everything stored for a job.
pub fn job_prefix(job_id: JobId) -> BlobKey {
    BlobKey::from_segments(&["jobs", &job_id.to_string()]).expect("a job id is one key segment")
}

/// `jobs/{id}/{file}`: a file the trainer published for the job.
///
/// # Errors
/// [`crate::Error::InvalidInput`] for a file name that is not one segment.
pub fn job_file(job_id: JobId, file: &str) -> Result<BlobKey> {
    job_prefix(job_id).join(segment("file", file)?)
}

/// The job whose objects `key` lies among (`jobs/{id}/...`).
pub fn job_of(key: &BlobKey) -> Option<JobId> {
    let mut segments = key.as_str().split('/');
    match (segments.next(), segments.next(), segments.next()) {
        (Some("jobs"), Some(id), Some(_)) => id.parse().ok(),
        _ => None,
    }
}

/// Whether `key` lies strictly below `prefix` (whole segments: `users/al`
/// does not contain `users/alice/x`).
pub fn is_below(key: &BlobKey, prefix: &BlobKey) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|rest| !rest.is_empty())
}

/// Where a job's checkpoint sets live, `jobs/{id}/epochs`: one set per
/// epoch, `{epoch:06}/` (zero-padded, so the sets list in order).
///
/// # Errors
/// None for a real job id; the key is built from checked segments.
pub fn checkpoint_sets_prefix(job_id: JobId) -> Result<BlobKey> {
    job_prefix(job_id).join("epochs")
}

/// The prefix of the job's checkpoint set of `epoch`,
/// `jobs/{id}/epochs/{epoch:06}` (see [`checkpoint_sets_prefix`]).
///
/// # Errors
/// As [`checkpoint_sets_prefix`].
pub fn checkpoint_set_prefix(job_id: JobId, epoch: u32) -> Result<BlobKey> {
    checkpoint_sets_prefix(job_id)?.join(&format!("{epoch:06}"))
}

/// The epoch of `key` when it lies inside one of the job's checkpoint sets
/// (`jobs/{id}/epochs/{n}/...`, see [`checkpoint_sets_prefix`]).
pub fn checkpoint_set_epoch(job_id: JobId, key: &BlobKey) -> Option<u32> {
    key.strip_prefix(&checkpoint_sets_prefix(job_id).ok()?)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_sets_are_laid_out_per_job_and_epoch() {
        let id = JobId::new();
        let set = checkpoint_set_prefix(id, 7).unwrap();
        assert_eq!(set.as_str(), format!("jobs/{id}/epochs/000007"));
        let weights = set.join("last.safetensors").unwrap();
        assert_eq!(checkpoint_set_epoch(id, &weights), Some(7));
        assert_eq!(
            checkpoint_set_epoch(JobId::new(), &weights),
            None,
            "another job's"
        );
        let loose = job_file(id, "last.safetensors").unwrap();
        assert_eq!(loose.as_str(), format!("jobs/{id}/last.safetensors"));
        assert_eq!(checkpoint_set_epoch(id, &loose), None, "not in a set");
        assert_eq!(job_of(&loose), Some(id));
        assert_eq!(job_of(&weights), Some(id));
        assert_eq!(
            job_of(&job_prefix(id)),
            None,
            "the prefix itself is no object"
        );
        assert!(is_below(&loose, &job_prefix(id)));
        assert!(!is_below(&loose, &job_prefix(JobId::new())));
    }

    #[test]
    fn uploads_are_laid_out_per_owner_kind_and_name() {
        let key = upload_key("alice", Upload::Dataset, "digits", "digits.zip").unwrap();
        assert_eq!(key.as_str(), "users/alice/datasets/digits/digits.zip");
        assert!(is_below(&key, &user_prefix("alice").unwrap()));
        assert!(is_below(
            &key,
            &uploads_prefix("alice", Upload::Dataset).unwrap()
        ));
        assert!(is_below(
            &key,
            &upload_prefix("alice", Upload::Dataset, "digits").unwrap()
        ));
        assert!(!is_below(
            &key,
            &uploads_prefix("alice", Upload::Code).unwrap()
        ));
        assert!(
            !is_below(&key, &user_prefix("ali").unwrap()),
            "whole segments"
        );
        assert!(!is_below(&key, &key), "strictly below");
        assert!(upload_key("alice", Upload::Code, "../x", "a.zip").is_err());
        for (owner, name, file) in [
            ("a/b", "x", "a.zip"),
            ("a", "x/y", "a.zip"),
            ("a", "x", "d/a.zip"),
        ] {
            assert!(
                upload_key(owner, Upload::Code, name, file).is_err(),
                "{owner} {name} {file}"
            );
        }
        assert!(job_file(JobId::new(), "epochs/000001/x").is_err());
        let staged = staging_key();
        assert!(is_below(&staged, &staging_prefix()));
        assert_ne!(staged, staging_key(), "one key per upload");
    }
}
