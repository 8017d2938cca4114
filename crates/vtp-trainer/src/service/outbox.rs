//! The callback outbox: every report a trainer makes is written to disk with
//! a per-job sequence number before it is sent, then delivered in order with
//! exponential backoff and jitter until the backend takes it. Reports survive
//! a backend outage and a trainer restart; the sequence number makes the
//! backend ignore any it already has.
//!
//! Layout: `{dir}/{job_id}/{seq:010}.json` per pending report and
//! `{dir}/{job_id}/seq` with the last sequence number handed out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::Instrument as _;
use vtp_core::{BackoffConfig, CallbackSecret, Error, JobId, Result, TrainingReport};

/// One pending report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Where it goes.
    pub callback_url: String,
    /// The job's secret, which signs the report at each delivery attempt
    /// (the entry file is readable by the trainer's user only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_secret: Option<CallbackSecret>,
    /// What it says (with `seq` set).
    pub update: TrainingReport,
    /// The W3C trace context of the span that made the report (an epoch,
    /// the job), when traces are exported: each delivery attempt is a
    /// `report` span under it, and the request carries that span's
    /// context in its `traceparent` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

#[derive(Debug)]
struct JobState {
    failures: u32,
    next_attempt: Instant,
}

/// A persisted, ordered, retrying sender of trainer reports.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    client: reqwest::Client,
    backoff: BackoffConfig,
    give_up_after: Duration,
    seqs: Mutex<HashMap<JobId, i64>>,
    retry_state: Mutex<HashMap<JobId, JobState>>,
    notify: Notify,
    idle: Notify,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("outbox {}: {e}", path.display()))
}

impl Outbox {
    /// Opens (creating) an outbox in `dir`; pending reports from an earlier
    /// run are delivered once [`Outbox::run`] starts.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        // Reports never follow redirects: the callback URL was checked against
        // the backend's origin, and a redirect could point anywhere.
        let client = crate::tls::client_builder()?
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::internal(format!("HTTP client: {e}")))?;
        Ok(Outbox {
            dir: dir.to_path_buf(),
            client,
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            give_up_after: Duration::from_secs(24 * 3600),
            seqs: Mutex::new(HashMap::new()),
            retry_state: Mutex::new(HashMap::new()),
            notify: Notify::new(),
            idle: Notify::new(),
        })
    }

    /// Sets the retry delays.
    #[must_use]
    pub fn with_backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = backoff;
        self
    }

    fn job_dir(&self, job_id: JobId) -> PathBuf {
        self.dir.join(job_id.to_string())
    }
}

/// The last sequence number handed out for `job_id`: cached, else persisted in `dir`.
fn last_seq(seqs: &HashMap<JobId, i64>, job_id: JobId, dir: &Path) -> i64 {
    match seqs.get(&job_id) {
        Some(last) => *last,
        None => std::fs::read_to_string(dir.join("seq"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0),
    }
}

impl Outbox {
    /// Persists `update` for `job_id` with the next sequence number and wakes
    /// the sender. Safe to call from any thread. Returns the sequence number.
    /// `traceparent` is the trace context the report was made in
    /// ([`OutboxEntry::traceparent`]).
    ///
    /// # Errors
    /// I/O errors (the report is then not queued).
    pub fn enqueue(
        &self,
        job_id: JobId,
        callback_url: &str,
        callback_secret: Option<&CallbackSecret>,
        mut update: TrainingReport,
        traceparent: Option<String>,
    ) -> Result<i64> {
        let dir = self.job_dir(job_id);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let mut seqs = self.seqs.lock().expect("outbox lock");
        let seq = last_seq(&seqs, job_id, &dir) + 1;
        update.seq = Some(seq);
        update.job_id = Some(job_id);
        let entry = OutboxEntry {
            callback_url: callback_url.to_owned(),
            callback_secret: callback_secret.cloned(),
            update,
            traceparent,
        };
        let json = serde_json::to_vec(&entry).map_err(|e| Error::internal(e.to_string()))?;
        let path = dir.join(format!("{seq:010}.json"));
        let tmp = dir.join(format!(".{seq:010}.tmp"));
        write_private(&tmp, &json).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
        std::fs::write(dir.join("seq"), seq.to_string()).map_err(|e| io(&dir, e))?;
        seqs.insert(job_id, seq);
        drop(seqs);
        self.notify.notify_one();
        Ok(seq)
    }

    /// Makes the next sequence number of `job_id` greater than `floor`. A
    /// retried one-shot trainer (a new pod with an empty outbox) starts
    /// above every report an earlier attempt sent, so the backend does not
    /// drop its reports as replays.
    ///
    /// # Errors
    /// I/O errors writing the counter.
    pub fn raise_seq_floor(&self, job_id: JobId, floor: i64) -> Result<()> {
        let dir = self.job_dir(job_id);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let mut seqs = self.seqs.lock().expect("outbox lock");
        if last_seq(&seqs, job_id, &dir) < floor {
            std::fs::write(dir.join("seq"), floor.to_string()).map_err(|e| io(&dir, e))?;
            seqs.insert(job_id, floor);
        }
        Ok(())
    }

    /// Whether reports for `job_id` wait to be delivered.
    pub fn has_pending(&self, job_id: JobId) -> bool {
        std::fs::read_dir(self.job_dir(job_id))
            .map(|entries| {
                entries
                    .filter_map(std::result::Result::ok)
                    .any(|e| e.path().extension().is_some_and(|x| x == "json"))
            })
            .unwrap_or(false)
    }

    /// Reports not yet delivered, oldest first per job.
    pub fn pending(&self) -> Vec<(JobId, PathBuf)> {
        let mut out = Vec::new();
        let Ok(jobs) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for job in jobs.filter_map(std::result::Result::ok) {
            let Some(job_id) = job
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<JobId>().ok())
            else {
                continue;
            };
            let Ok(files) = std::fs::read_dir(job.path()) else {
                continue;
            };
            let mut files: Vec<PathBuf> = files
                .filter_map(std::result::Result::ok)
                .map(|f| f.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            files.sort();
            out.extend(files.into_iter().map(|f| (job_id, f)));
        }
        out
    }

    /// Waits until nothing is pending, or `timeout` passes; returns whether it drained.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.pending().is_empty() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(100)), self.idle.notified())
                    .await;
        }
    }

    /// The wait before the next try after `failures` failed ones: the
    /// backoff with jitter between half and the whole delay, but never less
    /// than the backend's `Retry-After` (itself spread over up to half as
    /// much again, so trainers told the same time do not all come back in
    /// the same instant).
    fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self.backoff.init_backoff.as_secs_f64()
            * f64::from(self.backoff.base).powi(failures.min(30) as i32);
        let capped = exp.min(self.backoff.max_backoff.as_secs_f64());
        let backoff = capped * rand::rng().random_range(0.5..=1.0);
        let asked = retry_after.map_or(0.0, |d| {
            d.as_secs_f64() * rand::rng().random_range(1.0..=1.5)
        });
        Duration::from_secs_f64(backoff.max(asked))
    }

    /// Delivers pending reports forever; run it as a task.
    pub async fn run(&self) {
        loop {
            let next_wake = self.deliver_due().await;
            if self.pending().is_empty() {
                self.idle.notify_waiters();
            }
            let wait = next_wake.map_or(Duration::from_secs(60), |at| {
                at.saturating_duration_since(Instant::now())
            });
            let _ = tokio::time::timeout(wait, self.notify.notified()).await;
        }
    }

    /// One pass: sends every due job's reports in order; returns when the
    /// next backed-off job is due.
    async fn deliver_due(&self) -> Option<Instant> {
        let mut next_wake: Option<Instant> = None;
        let mut blocked: Vec<JobId> = Vec::new();
        for (job_id, path) in self.pending() {
            if blocked.contains(&job_id) {
                continue;
            }
            let due = self
                .retry_state
                .lock()
                .expect("outbox lock")
                .get(&job_id)
                .map(|s| s.next_attempt);
            if let Some(at) = due
                && at > Instant::now()
            {
                blocked.push(job_id);
                next_wake = Some(next_wake.map_or(at, |w| w.min(at)));
                continue;
            }
            match self.send(&path).await {
                Delivery::Done => {
                    metrics::counter!("vtp_trainer_reports_sent_total").increment(1);
                    let _ = std::fs::remove_file(&path);
                    self.retry_state
                        .lock()
                        .expect("outbox lock")
                        .remove(&job_id);
                }
                Delivery::Retry(reason, retry_after) => {
                    metrics::counter!("vtp_trainer_report_failures_total").increment(1);
                    let mut states = self.retry_state.lock().expect("outbox lock");
                    let state = states.entry(job_id).or_insert(JobState {
                        failures: 0,
                        next_attempt: Instant::now(),
                    });
                    state.failures += 1;
                    let age = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    if age.is_some_and(|age| age > self.give_up_after) {
                        tracing::error!(%job_id, path = %path.display(), %reason, "giving up on a report after its deadline");
                        let _ = std::fs::remove_file(&path);
                        states.remove(&job_id);
                        continue;
                    }
                    state.next_attempt =
                        Instant::now() + self.delay(state.failures - 1, retry_after);
                    tracing::warn!(%job_id, failures = state.failures, %reason, "report not delivered; will retry");
                    next_wake =
                        Some(next_wake.map_or(state.next_attempt, |w| w.min(state.next_attempt)));
                    blocked.push(job_id);
                }
            }
        }
        next_wake
    }

    async fn send(&self, path: &Path) -> Delivery {
        let entry: OutboxEntry = match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(entry) => entry,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "dropping an unreadable outbox entry");
                return Delivery::Done;
            }
        };
        let body = match serde_json::to_vec(&entry.update) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "dropping an unencodable report");
                return Delivery::Done;
            }
        };
        let mut request = self
            .client
            .post(&entry.callback_url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = &entry.callback_secret {
            // The id is the same on every retry of this report.
            let msg_id = format!(
                "{}-{}",
                entry
                    .update
                    .job_id
                    .map(|j| j.to_string())
                    .unwrap_or_default(),
                entry.update.seq.unwrap_or_default()
            );
            match secret.headers(&msg_id, &body) {
                Ok(headers) => {
                    for (name, value) in headers {
                        request = request.header(name, value);
                    }
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "dropping a report with a malformed secret");
                    return Delivery::Done;
                }
            }
        }
        // One span per delivery attempt, in the trace the report was made
        // in; the backend's span for the callback joins it.
        let span = tracing::info_span!(
            "report",
            job_id = %entry.update.job_id.map(|j| j.to_string()).unwrap_or_default(),
            seq = entry.update.seq.unwrap_or_default(),
            status = %entry.update.status,
            delivered = tracing::field::Empty,
        );
        vtp_http::telemetry::set_parent(&span, entry.traceparent.as_deref());
        if let Some(traceparent) = vtp_http::telemetry::traceparent(&span) {
            request = request.header(vtp_http::telemetry::TRACEPARENT_HEADER, traceparent);
        }
        let delivery = post(request, body, &entry).instrument(span.clone()).await;
        span.record("delivered", matches!(delivery, Delivery::Done));
        delivery
    }
}

/// Sends one report; what became of it.
async fn post(request: reqwest::RequestBuilder, body: Vec<u8>, entry: &OutboxEntry) -> Delivery {
    match request.body(body).send().await {
        Ok(response) if response.status().is_success() => Delivery::Done,
        Ok(response)
            if response.status().is_server_error() || response.status().as_u16() == 429 =>
        {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                // Capped: a proxy asking for minutes must not keep a
                // trainer silent past its lease.
                .map(|secs| Duration::from_secs(secs.min(MAX_RETRY_AFTER_SECS)));
            Delivery::Retry(
                format!("backend answered {}", response.status()),
                retry_after,
            )
        }
        Ok(response) => {
            // 404 (job unknown), 409 (already finished), 422 (refused): resending cannot help.
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            tracing::warn!(seq = ?entry.update.seq, %status, %body, "backend refused a report; dropped");
            Delivery::Done
        }
        Err(e) => Delivery::Retry(format!("{}: {e}", entry.callback_url), None),
    }
}

/// Writes `bytes` to a new file readable by this user only (it may hold a
/// job's callback secret).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

/// The longest `Retry-After` honoured, in seconds.
const MAX_RETRY_AFTER_SECS: u64 = 30;

enum Delivery {
    Done,
    /// Not taken now: why, and the backend's `Retry-After`, if it sent one.
    Retry(String, Option<Duration>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_with_jitter_and_honour_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let first: Vec<Duration> = (0..200).map(|_| outbox.delay(0, None)).collect();
        assert!(
            first
                .iter()
                .all(|d| (Duration::from_millis(100)..=Duration::from_millis(200)).contains(d)),
            "{first:?}"
        );
        // Spread: two hundred trainers failing at once do not all come back
        // in the same millisecond.
        let mut millis: Vec<u128> = first.iter().map(Duration::as_millis).collect();
        millis.dedup();
        millis.sort_unstable();
        millis.dedup();
        assert!(millis.len() > 20, "{millis:?}");
        // Capped, however long the outage.
        assert!(outbox.delay(40, None) <= Duration::from_secs(5));
        // Never sooner than the backend asked, and spread beyond it.
        let told: Vec<Duration> = (0..200)
            .map(|_| outbox.delay(0, Some(Duration::from_secs(3))))
            .collect();
        assert!(
            told.iter()
                .all(|d| (Duration::from_secs(3)..=Duration::from_millis(4500)).contains(d)),
            "{told:?}"
        );
        assert!(told.iter().any(|d| *d > Duration::from_millis(3300)));
    }
}
