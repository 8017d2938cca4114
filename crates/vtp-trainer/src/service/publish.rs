//! The end of a job's data path: its final checkpoints under
//! `jobs/{job_id}/`, and what a cancelled job keeps.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use vtp_core::{
    BlobStoreExt, Error, JobId, JobStatus, Result, StartTraining, TrainingReport, error_chain,
};

use super::{TrainerService, checkpoints};

impl TrainerService {
    /// A cancelled job's last update: it keeps the last checkpoint saved
    /// (uploaded now, on a best effort: the sets stored after each epoch
    /// are there whatever happens).
    pub(super) async fn cancelled_update(
        &self,
        job_id: JobId,
        output: &Path,
        reason: impl Into<String>,
    ) -> TrainingReport {
        let uploaded = self
            .upload_checkpoints(job_id, output)
            .await
            .unwrap_or_default();
        let mut update = TrainingReport::new(JobStatus::Cancelled).with_message(reason);
        if let Some(uri) =
            checkpoints::main_file(uploaded.keys(), "last").and_then(|name| uploaded.get(name))
        {
            update = update.with_checkpoint(uri.clone());
        }
        update
    }

    /// Uploads the trained model, retrying an outage for up to
    /// [`ServiceOptions::upload_budget`] (the files stay on this disk, and
    /// heartbeats keep the job's lease, until every upload is confirmed):
    /// hours of training are not given up for a short S3 outage.
    pub(super) async fn upload_final(
        &self,
        request: &StartTraining,
        output: &Path,
    ) -> Result<BTreeMap<String, String>> {
        let job_id = request.job_id;
        let started = std::time::Instant::now();
        let mut wait = Duration::from_secs(1);
        loop {
            match self.upload_checkpoints(job_id, output).await {
                Ok(uploaded) => return Ok(uploaded),
                Err(e) if e.is_retryable() && started.elapsed() + wait < self.upload_budget => {
                    let message = format!(
                        "uploading the trained model failed ({}); retrying in {}s",
                        error_chain(&e),
                        wait.as_secs()
                    );
                    tracing::warn!(%job_id, %message);
                    self.report(
                        request,
                        TrainingReport::new(JobStatus::Running).with_message(message),
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Uploads every checkpoint file under `jobs/{job_id}/`, each checked
    /// by its stored size; returns file name -> URI.
    pub(super) async fn upload_checkpoints(
        &self,
        job_id: JobId,
        output: &Path,
    ) -> Result<BTreeMap<String, String>> {
        let mut uploaded = BTreeMap::new();
        let mut entries = tokio::fs::read_dir(output)
            .await
            .map_err(|e| Error::internal(format!("{}: {e}", output.display())))?;
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let key = vtp_core::layout::job_file(job_id, &name)?;
            let size = entry
                .metadata()
                .await
                .map_err(|e| Error::internal(format!("{}: {e}", entry.path().display())))?
                .len();
            checkpoints::put_file_checked(self.blobs.as_ref(), &key, &entry.path(), size).await?;
            uploaded.insert(name, self.blobs.uri(&key));
        }
        Ok(uploaded)
    }
}
