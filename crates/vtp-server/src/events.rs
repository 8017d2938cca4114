//! Job event streams (`GET /training/jobs/{id}/events`): one shared feed
//! per job, however many clients watch it.
//!
//! A job's stream is its history (the events the store keeps: each status
//! change and each epoch, numbered by revision) followed by its changes as
//! they happen. Progress alone (heartbeats, steps, messages) is not history
//! ([`vtp_core::EventKind::is_history`]): a stream shows it as one
//! `progress` event carrying the job as it is now, numbered by its current
//! revision. So a client reconnecting with `Last-Event-ID` gets every status
//! and epoch it missed, none twice, and the latest progress.
//!
//! **One reader per job, not per stream.** A [`Feed`] per watched job reads
//! the job when this process changed it (the store announces every write,
//! [`crate::AppState::changes`]) and otherwise every [`POLL`] (changes made
//! by another replica), and broadcasts what is new to every stream of the
//! job. A stream reads the store itself only to catch up: when it opens, and
//! when it fell too far behind the broadcast. A feed ends with its last
//! stream.
//!
//! **Bounds.** Streams per user and in all are capped
//! ([`crate::limits::Limits::open_stream`], 429 beyond); a stream lives at
//! most [`crate::limits::LimitSettings::stream_lifetime`] (the client
//! reconnects and misses nothing); and every stream ends when the server
//! shuts down, so a graceful shutdown does not wait on them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::broadcast;
use vtp_core::{EventKind, Job, JobEvent, JobId, JobStore};

use crate::AppState;
use crate::error::error_chain;
use crate::limits::Held;

/// How often a feed reads its job when this process did not change it.
pub const POLL: Duration = Duration::from_secs(2);
/// Events read from the store at once.
const PAGE: u32 = 500;
/// Events a feed holds for a slow stream before that stream must catch up
/// from the store.
const BACKLOG: usize = 256;

/// The feeds of the jobs being watched in this process.
pub struct Feeds {
    store: Arc<dyn JobStore>,
    changes: broadcast::Sender<JobId>,
    feeds: Mutex<HashMap<JobId, Weak<Feed>>>,
}

impl std::fmt::Debug for Feeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feeds")
            .field("jobs", &self.lock().len())
            .finish()
    }
}

/// One job's feed: what its poller broadcasts to the job's streams. The
/// poller drops the sender when it ends, which its streams see as the
/// channel closing.
#[derive(Debug)]
pub struct Feed {
    tx: Mutex<Option<broadcast::Sender<Arc<JobEvent>>>>,
}

impl Feed {
    fn sender(&self) -> Option<broadcast::Sender<Arc<JobEvent>>> {
        self.tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn close(&self) {
        self.tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

impl Feeds {
    /// Feeds reading `store`, woken by `changes`.
    pub fn new(store: Arc<dyn JobStore>, changes: broadcast::Sender<JobId>) -> Self {
        Feeds {
            store,
            changes,
            feeds: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Weak<Feed>>> {
        self.feeds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Jobs with a feed now.
    pub fn len(&self) -> usize {
        self.lock()
            .values()
            .filter(|f| f.strong_count() > 0)
            .count()
    }

    /// Whether no job has one.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The feed of `job` (started, with `job`'s revision as what its
    /// watchers have, if there is none) and a receiver of what it
    /// broadcasts from now on.
    fn subscribe(&self, job: &Job) -> (Arc<Feed>, broadcast::Receiver<Arc<JobEvent>>) {
        let mut feeds = self.lock();
        if let Some(feed) = feeds.get(&job.id).and_then(Weak::upgrade)
            && let Some(tx) = feed.sender()
        {
            let rx = tx.subscribe();
            return (feed, rx);
        }
        feeds.retain(|_, feed| feed.strong_count() > 0);
        let (tx, rx) = broadcast::channel(BACKLOG);
        let feed = Arc::new(Feed {
            tx: Mutex::new(Some(tx)),
        });
        feeds.insert(job.id, Arc::downgrade(&feed));
        tokio::spawn(poll(
            self.store.clone(),
            Arc::downgrade(&feed),
            self.changes.subscribe(),
            job.id,
            job.revision,
        ));
        (feed, rx)
    }
}

/// A feed's one reader: reads the job when woken or every [`POLL`], and
/// broadcasts its new history and its latest progress, until no stream
/// holds the feed or the job has ended.
async fn poll(
    store: Arc<dyn JobStore>,
    feed: Weak<Feed>,
    changes: broadcast::Receiver<JobId>,
    id: JobId,
    last: i64,
) {
    poll_until_done(store, &feed, changes, id, last).await;
    if let Some(feed) = feed.upgrade() {
        feed.close();
    }
}

async fn poll_until_done(
    store: Arc<dyn JobStore>,
    feed: &Weak<Feed>,
    mut changes: broadcast::Receiver<JobId>,
    id: JobId,
    mut last: i64,
) {
    loop {
        let Some(tx) = feed.upgrade().and_then(|feed| feed.sender()) else {
            return;
        };
        match read_since(store.as_ref(), id, last).await {
            Ok((events, job)) => {
                for event in events {
                    last = event.revision;
                    let _ = tx.send(Arc::new(event));
                }
                if job.status.is_terminal() && last >= job.revision {
                    return;
                }
            }
            Err(vtp_core::Error::NotFound { .. }) => return,
            Err(e) => {
                tracing::debug!(job_id = %id, error = %error_chain(&e), "event feed: cannot read the job; next poll");
            }
        }
        drop(tx);
        // Wait for this process to change the job, or poll.
        let _ = tokio::time::timeout(POLL, async {
            loop {
                match changes.recv().await {
                    Ok(changed) if changed == id => return,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        })
        .await;
    }
}

/// What changed since revision `after`: the stored history up to the job's
/// current revision and, when the job moved on since its last history event
/// (progress), one `progress` event with the job as it is; and the job.
///
/// The job is read first: every history event up to its revision was
/// written with it, so none is skipped, and later ones wait for the next
/// read, so revisions only rise.
async fn read_since(
    store: &dyn JobStore,
    id: JobId,
    after: i64,
) -> vtp_core::Result<(Vec<JobEvent>, Job)> {
    let job = store.get(id).await?;
    if job.deleted_at.is_some() {
        return Err(vtp_core::Error::not_found("job", id));
    }
    let mut events = Vec::new();
    if job.revision <= after {
        return Ok((events, job));
    }
    let mut cursor = after;
    loop {
        let page = store.events(id, cursor, PAGE).await?;
        let full = page.len() >= PAGE as usize;
        let mut past = false;
        for event in page {
            if event.revision > job.revision {
                past = true;
                break;
            }
            cursor = event.revision;
            events.push(event);
        }
        if !full || past {
            break;
        }
    }
    if cursor < job.revision {
        // Progress since the last history event (or a job older than the
        // event log, whose present state stands for its history).
        let kind = if after < 0 && events.is_empty() {
            EventKind::Status
        } else {
            EventKind::Progress
        };
        let mut event = JobEvent::of_change(None, &job, None);
        event.kind = kind;
        events.push(event);
    }
    Ok((events, job))
}

/// One client's stream: what it has been sent, and its place in the feed.
struct Cursor {
    state: AppState,
    /// The job as first read, for its config and its owner.
    job: Job,
    after: i64,
    pending: VecDeque<JobEvent>,
    feed: Option<(Arc<Feed>, broadcast::Receiver<Arc<JobEvent>>)>,
    catch_up: bool,
    finished: bool,
    _held: Held,
}

impl Drop for Cursor {
    fn drop(&mut self) {
        metrics::gauge!("vtp_event_streams").decrement(1.0);
    }
}

impl Cursor {
    /// The next event to send; `None` ends the stream.
    async fn next(&mut self) -> Option<axum::response::sse::Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.after = event.revision;
                if event.job.status.is_terminal() {
                    self.finished = true;
                }
                return Some(self.render(event));
            }
            if self.finished {
                return None;
            }
            if self.feed.is_none() {
                self.feed = Some(self.state.feeds.subscribe(&self.job));
                self.catch_up = true;
            }
            if self.catch_up {
                self.catch_up = false;
                match read_since(self.state.jobs.as_ref(), self.job.id, self.after).await {
                    Ok((events, _)) => self.pending.extend(events),
                    Err(e) => {
                        // The client reconnects with Last-Event-ID and misses nothing.
                        tracing::warn!(job_id = %self.job.id, error = %error_chain(&e), "event stream: cannot read the job's events");
                        self.finished = true;
                        return Some(
                            axum::response::sse::Event::default()
                                .event("error")
                                .data(vtp_core::api::error_status(&e).1),
                        );
                    }
                }
                continue;
            }
            let (_, rx) = self.feed.as_mut()?;
            match rx.recv().await {
                Ok(event) if event.revision > self.after => {
                    self.pending.push_back(event.as_ref().clone());
                }
                Ok(_) => {}
                // Too far behind: read what was missed from the store.
                Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up = true,
                // The feed ended (its job ended, or was deleted): read the
                // rest, and watch again if the job goes on.
                Err(broadcast::error::RecvError::Closed) => {
                    self.feed = None;
                    match self.state.jobs.get(self.job.id).await {
                        Ok(job) if job.status.is_terminal() && job.revision <= self.after => {
                            return None;
                        }
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
            }
        }
    }

    fn render(&self, mut event: JobEvent) -> axum::response::sse::Event {
        event.job.config.clone_from(&self.job.config);
        event.job = self.state.present(event.job);
        let data = serde_json::to_string(&event).unwrap_or_else(|_| "{}".to_owned());
        axum::response::sse::Event::default()
            .id(event.revision.to_string())
            .event(event.kind.as_str())
            .data(data)
    }
}

/// The stream of `job`'s events after revision `after`, for a client that
/// holds `held` (its place under the stream caps): it ends when the job has
/// ended and everything was sent, after the stream's lifetime, or when the
/// server shuts down.
pub fn stream(
    state: AppState,
    job: Job,
    after: i64,
    held: Held,
) -> impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>> + Send
{
    metrics::gauge!("vtp_event_streams").increment(1.0);
    let lifetime = state.limits.settings().stream_lifetime;
    let shutdown = state.shutdown.clone();
    let cursor = Cursor {
        state,
        job,
        after,
        pending: VecDeque::new(),
        feed: None,
        catch_up: true,
        finished: false,
        _held: held,
    };
    futures::stream::unfold(cursor, |mut cursor| async move {
        let event = cursor.next().await?;
        Some((Ok(event), cursor))
    })
    .take_until(tokio::time::sleep(lifetime))
    .take_until(shutdown.cancelled_owned())
}
