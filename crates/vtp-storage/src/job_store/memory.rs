//! [`InMemoryJobStore`]: for tests and throwaway runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use vtp_core::{
    CallbackSecret, CredentialStore, Error, Expected, Job, JobEvent, JobFilter, JobId, JobPage,
    JobStore, Result, TokenRecord, TrainingMetric,
};

#[derive(Debug, Default)]
struct State {
    jobs: HashMap<JobId, Job>,
    metrics: BTreeMap<(JobId, u32), TrainingMetric>,
    events: BTreeMap<(JobId, i64), JobEvent>,
    tokens: Vec<TokenRecord>,
    secrets: HashMap<JobId, CallbackSecret>,
}

/// A [`JobStore`] (and [`CredentialStore`]) in process memory; nothing
/// survives the process.
#[derive(Debug, Default)]
pub struct InMemoryJobStore {
    state: Mutex<State>,
}

impl InMemoryJobStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-written job:
        // every write below is a single insert.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl JobStore for InMemoryJobStore {
    async fn create(&self, job: &Job) -> Result<()> {
        let mut state = self.lock();
        if state.jobs.contains_key(&job.id) {
            return Err(Error::AlreadyExists {
                kind: "job",
                id: job.id.to_string(),
            });
        }
        if let Some(keyed) = &job.idempotency.create
            && state
                .jobs
                .values()
                .any(|other| other.user_id == job.user_id && same_create_key(other, &keyed.key))
        {
            return Err(Error::AlreadyExists {
                kind: "idempotency key",
                id: keyed.key.clone(),
            });
        }
        state.jobs.insert(job.id, job.clone());
        state
            .events
            .insert((job.id, job.revision), JobEvent::of_change(None, job, None));
        Ok(())
    }

    async fn get(&self, id: JobId) -> Result<Job> {
        self.lock()
            .jobs
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::not_found("job", id))
    }

    async fn find_created_with_key(&self, user_id: &str, key: &str) -> Result<Option<Job>> {
        Ok(self
            .lock()
            .jobs
            .values()
            .find(|job| job.user_id == user_id && same_create_key(job, key))
            .cloned())
    }

    async fn list(&self, filter: &JobFilter) -> Result<JobPage> {
        let state = self.lock();
        let mut matching: Vec<&Job> = state.jobs.values().filter(|j| filter.matches(j)).collect();
        matching.sort_by_key(|job| std::cmp::Reverse((job.created_at, job.id)));
        let limit = filter.effective_limit();
        Ok(JobPage {
            total: matching.len() as u64,
            jobs: matching
                .into_iter()
                .skip(filter.offset as usize)
                .take(limit as usize)
                .cloned()
                .collect(),
            limit,
            offset: filter.offset,
        })
    }

    async fn compare_and_set(
        &self,
        expected: Expected,
        next: &Job,
        metric: Option<&TrainingMetric>,
    ) -> Result<Job> {
        let mut state = self.lock();
        let current = state
            .jobs
            .get(&next.id)
            .ok_or_else(|| Error::not_found("job", next.id))?;
        if current.status != expected.status || expected.revision != current.revision {
            return Err(Error::conflict(format!(
                "job {} changed concurrently: expected {} (revision {}), found {} (revision {})",
                next.id, expected.status, expected.revision, current.status, current.revision
            )));
        }
        // Only the mutable fields change; identity and request stay as stored.
        let mut stored = current.clone();
        stored.status = next.status;
        stored.progress = next.progress;
        stored.message.clone_from(&next.message);
        stored.error.clone_from(&next.error);
        stored.checkpoint_s3_uri.clone_from(&next.checkpoint_s3_uri);
        stored
            .last_checkpoint_s3_uri
            .clone_from(&next.last_checkpoint_s3_uri);
        stored.attempt = next.attempt;
        stored.attempts.clone_from(&next.attempts);
        stored.idempotency.start.clone_from(&next.idempotency.start);
        stored.last_seq = next.last_seq;
        stored.updated_at = next.updated_at;
        stored.started_at = next.started_at;
        stored.finished_at = next.finished_at;
        stored.revision = current.revision + 1;
        let event = JobEvent::of_change(Some(current.status), &stored, metric);
        state.jobs.insert(stored.id, stored.clone());
        state.events.insert((stored.id, stored.revision), event);
        // A newer report of an epoch replaces it; the same values again (a
        // resumed attempt re-reporting its set's epoch) change nothing.
        if let Some(metric) = metric
            && state
                .metrics
                .get(&(metric.job_id, metric.epoch))
                .is_none_or(|kept| kept.values != metric.values)
        {
            state
                .metrics
                .insert((metric.job_id, metric.epoch), metric.clone());
        }
        Ok(stored)
    }

    async fn events(&self, id: JobId, after: i64, limit: u32) -> Result<Vec<JobEvent>> {
        let state = self.lock();
        if !state.jobs.contains_key(&id) {
            return Err(Error::not_found("job", id));
        }
        Ok(state
            .events
            .range((id, after.saturating_add(1))..=(id, i64::MAX))
            .take(limit as usize)
            .map(|(_, event)| event.clone())
            .collect())
    }

    async fn insert_metric_if_absent(&self, metric: &TrainingMetric) -> Result<bool> {
        let mut state = self.lock();
        if !state.jobs.contains_key(&metric.job_id) {
            return Err(Error::not_found("job", metric.job_id));
        }
        let key = (metric.job_id, metric.epoch);
        if state.metrics.contains_key(&key) {
            return Ok(false);
        }
        state.metrics.insert(key, metric.clone());
        Ok(true)
    }

    async fn metrics(&self, id: JobId) -> Result<Vec<TrainingMetric>> {
        let state = self.lock();
        if !state.jobs.contains_key(&id) {
            return Err(Error::not_found("job", id));
        }
        Ok(state
            .metrics
            .range((id, 0)..=(id, u32::MAX))
            .map(|(_, m)| m.clone())
            .collect())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl CredentialStore for InMemoryJobStore {
    async fn insert_token(&self, record: &TokenRecord) -> Result<()> {
        let mut state = self.lock();
        if state
            .tokens
            .iter()
            .any(|t| t.id == record.id || t.hash == record.hash)
        {
            return Err(Error::AlreadyExists {
                kind: "token",
                id: record.id.clone(),
            });
        }
        state.tokens.push(record.clone());
        Ok(())
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        Ok(self
            .lock()
            .tokens
            .iter()
            .find(|t| t.hash == hash && t.revoked_at.is_none())
            .cloned())
    }

    async fn revoke_token(&self, id: &str) -> Result<TokenRecord> {
        let mut state = self.lock();
        let token = state
            .tokens
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| Error::not_found("token", id))?;
        token.revoked_at.get_or_insert_with(vtp_core::job::now);
        Ok(token.clone())
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let mut tokens = self.lock().tokens.clone();
        tokens.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        Ok(tokens)
    }

    async fn set_job_secret(&self, job_id: JobId, secret: &CallbackSecret) -> Result<()> {
        let mut state = self.lock();
        if !state.jobs.contains_key(&job_id) {
            return Err(Error::not_found("job", job_id));
        }
        state.secrets.insert(job_id, secret.clone());
        Ok(())
    }

    async fn job_secret(&self, job_id: JobId) -> Result<Option<CallbackSecret>> {
        Ok(self.lock().secrets.get(&job_id).cloned())
    }

    async fn job_secret_or_insert(
        &self,
        job_id: JobId,
        secret: &CallbackSecret,
    ) -> Result<CallbackSecret> {
        let mut state = self.lock();
        if !state.jobs.contains_key(&job_id) {
            return Err(Error::not_found("job", job_id));
        }
        Ok(state
            .secrets
            .entry(job_id)
            .or_insert_with(|| secret.clone())
            .clone())
    }
}

/// Whether `job` was created under the `Idempotency-Key` `key`.
fn same_create_key(job: &Job, key: &str) -> bool {
    job.idempotency
        .create
        .as_ref()
        .is_some_and(|keyed| keyed.key == key)
}
