//! [`InMemoryJobStore`]: for tests and throwaway runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use vtp_core::{
    CallbackSecret, CredentialStore, Error, Expected, Job, JobEvent, JobFilter, JobId, JobPage,
    JobStore, Quota, Result, TokenRecord, TrainingMetric,
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

impl State {
    /// How many of `user_id`'s jobs other than `except` are in the quota's statuses.
    fn count(&self, user_id: &str, except: JobId, quota: &Quota) -> u64 {
        self.jobs
            .values()
            .filter(|job| {
                job.user_id == user_id
                    && job.id != except
                    && job.deleted_at.is_none()
                    && quota.statuses.contains(&job.status)
            })
            .count() as u64
    }

    /// Every waiting job in queue order.
    fn queue(&self) -> Vec<Job> {
        let mut held: HashMap<String, u64> = HashMap::new();
        let mut waiting = Vec::new();
        for job in self.jobs.values().filter(|job| job.deleted_at.is_none()) {
            if job.holds_slot() {
                *held.entry(job.user_id.clone()).or_default() += 1;
            } else if job.is_waiting() {
                waiting.push(job.clone());
            }
        }
        vtp_core::queue_order(waiting, &held)
    }

    fn insert(&mut self, job: &Job) -> Result<()> {
        if self.jobs.contains_key(&job.id) {
            return Err(Error::AlreadyExists {
                kind: "job",
                id: job.id.to_string(),
            });
        }
        if let Some(keyed) = &job.idempotency.create
            && self
                .jobs
                .values()
                .any(|other| other.user_id == job.user_id && same_create_key(other, &keyed.key))
        {
            return Err(Error::AlreadyExists {
                kind: "idempotency key",
                id: keyed.key.clone(),
            });
        }
        self.jobs.insert(job.id, job.clone());
        self.events
            .insert((job.id, job.revision), JobEvent::of_change(None, job, None));
        Ok(())
    }

    fn compare_and_set(
        &mut self,
        expected: Expected,
        next: &Job,
        metric: Option<&TrainingMetric>,
    ) -> Result<Job> {
        let current = self
            .jobs
            .get(&next.id)
            .ok_or_else(|| Error::not_found("job", next.id))?;
        if !expected.matches(current) {
            return Err(expected.lost_to(next.id, current));
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
        stored.queued_at = next.queued_at;
        stored.launched_at = next.launched_at;
        stored.not_before = next.not_before;
        stored.deleted_at = next.deleted_at;
        stored.per_class.clone_from(&next.per_class);
        stored.revision = current.revision + 1;
        let event = JobEvent::of_change(Some(current.status), &stored, metric);
        self.jobs.insert(stored.id, stored.clone());
        if event.kind.is_history() {
            self.events.insert((stored.id, stored.revision), event);
        }
        // A newer report of an epoch replaces it; the same values again (a
        // resumed attempt re-reporting its set's epoch) change nothing.
        if let Some(metric) = metric
            && self
                .metrics
                .get(&(metric.job_id, metric.epoch))
                .is_none_or(|kept| kept.values != metric.values)
        {
            self.metrics
                .insert((metric.job_id, metric.epoch), metric.clone());
        }
        Ok(stored)
    }
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
        self.lock().insert(job)
    }

    async fn create_within(&self, job: &Job, quota: Quota) -> Result<()> {
        let mut state = self.lock();
        if state.count(&job.user_id, job.id, &quota) >= u64::from(quota.limit) {
            return Err(quota.exceeded(&job.user_id));
        }
        state.insert(job)
    }

    async fn compare_and_set_within(
        &self,
        expected: Expected,
        next: &Job,
        quota: Quota,
    ) -> Result<Job> {
        let mut state = self.lock();
        let current = state
            .jobs
            .get(&next.id)
            .ok_or_else(|| Error::not_found("job", next.id))?;
        if expected.matches(current)
            && state.count(&next.user_id, next.id, &quota) >= u64::from(quota.limit)
        {
            return Err(quota.exceeded(&next.user_id));
        }
        state.compare_and_set(expected, next, None)
    }

    async fn queue(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Job>> {
        Ok(self
            .lock()
            .queue()
            .into_iter()
            .filter(|job| job.not_before.is_none_or(|t| t <= now))
            .take(limit as usize)
            .collect())
    }

    async fn queue_positions(&self, user_id: Option<&str>) -> Result<HashMap<JobId, u64>> {
        Ok(self
            .lock()
            .queue()
            .into_iter()
            .zip(1..)
            .filter(|(job, _)| user_id.is_none_or(|u| u == job.user_id))
            .map(|(job, place)| (job.id, place))
            .collect())
    }

    async fn slots_taken(&self) -> Result<u64> {
        Ok(self
            .lock()
            .jobs
            .values()
            .filter(|job| job.deleted_at.is_none() && job.holds_slot())
            .count() as u64)
    }

    async fn delete(&self, id: JobId) -> Result<bool> {
        let mut state = self.lock();
        state.events.retain(|(job, _), _| *job != id);
        state.metrics.retain(|(job, _), _| *job != id);
        state.secrets.remove(&id);
        Ok(state.jobs.remove(&id).is_some())
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
        let jobs: Vec<Job> = matching
            .iter()
            .skip(filter.offset as usize)
            .take(limit as usize)
            .map(|job| (*job).clone())
            .collect();
        Ok(JobPage {
            total: matching.len() as u64,
            next_cursor: vtp_core::next_cursor(&jobs, limit),
            jobs,
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
        self.lock().compare_and_set(expected, next, metric)
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
