//! Ten thousand queued jobs on Postgres drain through the queue's
//! dispatcher in the queue's order, with the process's memory flat, and
//! recovery (a new leader) walks only the jobs a runner holds. The trainer
//! is a launcher that finishes each job as it is launched: what is under
//! test is the queue, not training.

use std::sync::{Arc, Mutex};

use vtp_core::{
    CancelOutcome, Capacity, Job, JobFilter, JobId, JobStatus, JobStore, JobStoreExt, NewJob,
    StartTraining, TrainerLauncher,
};
use vtp_server::AppState;
use vtp_storage::testing::TestDatabase;

/// A launcher with `slots` slots whose jobs finish the moment they are
/// launched; it records the order of launches and every question asked.
#[derive(Debug)]
struct InstantTrainer {
    jobs: Mutex<Option<Arc<dyn JobStore>>>,
    launched: Mutex<Vec<JobId>>,
    asked: std::sync::atomic::AtomicUsize,
    slots: u32,
}

#[async_trait::async_trait]
impl TrainerLauncher for InstantTrainer {
    fn name(&self) -> &'static str {
        "instant"
    }
    async fn capacity(&self) -> vtp_core::Result<Capacity> {
        Ok(Capacity::Slots(self.slots))
    }
    async fn launch(&self, request: &StartTraining) -> vtp_core::Result<()> {
        self.launched.lock().unwrap().push(request.job_id);
        let jobs = self.jobs.lock().unwrap().clone().unwrap();
        jobs.transition(request.job_id, JobStatus::Queued, JobStatus::Completed)
            .await?;
        Ok(())
    }
    async fn cancel(&self, _job_id: JobId) -> vtp_core::Result<CancelOutcome> {
        Ok(CancelOutcome::NotRunning)
    }
    async fn is_running(&self, _job_id: JobId) -> vtp_core::Result<bool> {
        self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(false)
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_queued_jobs_drain_in_order_with_memory_flat() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let stores = vtp_storage::connect_stores(db.url()).await.unwrap();
    let jobs = stores.jobs.clone();
    // Twenty users; a few jobs of priority 1 and of -1 among the rest.
    const N: usize = 10_000;
    use futures::StreamExt as _;
    // Sixteen at a time: the pool's connections.
    let made: Vec<Job> = futures::stream::iter((0..N).map(|i| {
        let jobs = jobs.clone();
        async move {
            let priority = match i % 97 {
                0 => 1,
                1 => -1,
                _ => 0,
            };
            let job = jobs
                .create_job(NewJob {
                    user_id: format!("user{:02}", i % 20),
                    model_name: "small_cnn".into(),
                    framework: "tch".into(),
                    dataset_s3_uri: "s3://b/users/u/datasets/d/".into(),
                    config: serde_json::json!({}),
                    priority,
                })
                .await
                .unwrap();
            jobs.transition(job.id, JobStatus::Pending, JobStatus::Queued)
                .await
                .unwrap()
        }
    }))
    .buffer_unordered(16)
    .collect()
    .await;
    // The order the queue is to drain in: the reference order, a pass of
    // `slots` at a time (every job finishes within its pass).
    let slots = 64;
    let mut expected = Vec::with_capacity(N);
    let mut waiting = made.clone();
    while !waiting.is_empty() {
        let order = vtp_core::queue_order(waiting, &Default::default());
        expected.extend(order.iter().take(slots).map(|job| job.id));
        waiting = order.into_iter().skip(slots).collect();
    }

    let trainer = Arc::new(InstantTrainer {
        jobs: Mutex::new(None),
        launched: Mutex::new(Vec::with_capacity(N)),
        asked: Default::default(),
        slots: slots as u32,
    });
    let blobs = Arc::new(vtp_storage::ObjectStoreBlobStore::in_memory());
    let state = AppState::new(stores, blobs, trainer.clone(), "http://127.0.0.1:1");
    *trainer.jobs.lock().unwrap() = Some(state.jobs.clone());

    // A new leader's recovery reads only the jobs a runner holds: none.
    assert_eq!(vtp_server::recover(&state).await.unwrap(), (0, 0));
    assert_eq!(
        trainer.asked.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no waiting job is asked about"
    );

    let before = rss_kib();
    let policy = vtp_server::queue::Policy {
        batch: slots as u32,
        ..vtp_server::queue::Policy::default()
    };
    let mut passes = 0;
    let mut peak = before;
    while vtp_server::queue::dispatch_once(&state, &policy)
        .await
        .unwrap()
        > 0
    {
        passes += 1;
        if passes % 16 == 0 {
            peak = peak.max(rss_kib());
        }
    }
    let after = rss_kib();
    let launched = trainer.launched.lock().unwrap().clone();
    assert_eq!(launched.len(), N, "every job launched, once");
    assert_eq!(launched, expected, "in the queue's order");
    let done = state
        .jobs
        .list(
            &JobFilter::new()
                .with_status(JobStatus::Completed)
                .with_page(1, 0),
        )
        .await
        .unwrap();
    assert_eq!(done.total, N as u64);
    let grown = peak.max(after).saturating_sub(before);
    eprintln!("drained {N} jobs in {passes} passes; RSS {before} KiB before, peak +{grown} KiB");
    assert!(
        grown < 32 * 1024,
        "memory grew by {grown} KiB while draining"
    );
}
