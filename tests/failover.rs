//! Several backends on one Postgres: two `vtp-backend` processes behind a
//! balancer (their public URL), a trainer service reached over HTTP, jobs
//! under way and one waiting. SIGKILL the leader: the other takes over
//! within seconds, the trainer's reports reach it through the balancer,
//! nothing is launched twice, no epoch is lost or trained twice, and the
//! waiting job is launched by the new leader.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Balancer, ServiceProcess, json_of};
use vtp_storage::testing::{TestDatabase, TestS3};

/// Whether the backend at `url` says it leads (its `vtp_leader` gauge).
async fn leads(http: &reqwest::Client, url: &str) -> bool {
    let Ok(response) = http.get(format!("{url}/metrics")).send().await else {
        return false;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines().any(|line| line.trim() == "vtp_leader 1")
}

async fn job(http: &reqwest::Client, base: &str, id: &str) -> Value {
    json_of(
        http.get(format!("{base}/training/jobs/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await
    .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_death_hands_its_duties_over_and_loses_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(s3) = TestS3::from_env() else { return };
    let work = tempfile::tempdir().unwrap();
    let blob_url = s3.fresh_url();
    let balancer = Balancer::start().await;
    let token = "vtp_failover-shared-token".to_owned();

    // One trainer service, two jobs at a time; its reports go to the
    // balancer, so to whichever backend is alive.
    let mut trainer_env = s3.env_for(&blob_url);
    trainer_env.extend([
        (
            "VTP_WORK_DIR",
            work.path().join("trainer").display().to_string(),
        ),
        ("VTP_BACKEND_URL", balancer.url()),
        ("VTP_TRAINER_TOKEN", token.clone()),
        ("VTP_TRAINER_CONCURRENCY", "2".to_owned()),
        ("VTP_HEARTBEAT_SECS", "2".to_owned()),
    ]);
    let trainer = ServiceProcess::spawn(
        &support::trainer_bin(),
        &["--listen", "127.0.0.1:0"],
        &trainer_env,
        "vtp-trainer-service listening on ",
    )
    .await;
    let mut env = s3.env_for(&blob_url);
    env.extend([
        ("VTP_DATABASE_URL", db.url().to_owned()),
        ("VTP_LAUNCHER", "http".to_owned()),
        ("VTP_TRAINER_URL", trainer.url.clone()),
        ("VTP_TRAINER_TOKEN", token),
        ("VTP_PUBLIC_URL", balancer.url()),
        ("VTP_HEARTBEAT_SECS", "2".to_owned()),
    ]);
    let first = ServiceProcess::start(&env).await;
    balancer.add(&first.url);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !leads(&http, &first.url).await {
        assert!(Instant::now() < deadline, "the first backend never led");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = ServiceProcess::start(&env).await;
    balancer.add(&second.url);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!leads(&http, &second.url).await, "one leader at a time");

    // Through the balancer, as a user would: two jobs that train for a
    // while, and a third that waits for a slot.
    let base = balancer.url();
    // Long enough to be under way when the leader dies (about half a
    // second an epoch here), short enough for the suite.
    let dataset = support::upload_shapes_to(&http, &base, "failover", 100, 5).await;
    let epochs: u32 = 40;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let body = json!({"user_id": "failover", "model_name": "small_cnn", "framework": "tch",
                          "dataset_s3_uri": dataset,
                          "config": {"epochs": epochs, "image_size": 32, "batch_size": 16,
                                     "threads": 1, "workers": 1, "hflip": false}});
        let (status, job) = json_of(
            http.post(format!("{base}/training/jobs"))
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 201, "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        let response = http
            .post(format!("{base}/training/jobs/{id}/start"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        ids.push(id);
    }
    // Two slots: once the first two are launched, the third waits, first
    // in the queue.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let first_two = [
            job(&http, &base, &ids[0]).await,
            job(&http, &base, &ids[1]).await,
        ];
        if first_two.iter().all(|j| j["launched_at"].is_string()) {
            break;
        }
        assert!(Instant::now() < deadline, "{first_two:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waiting = job(&http, &base, &ids[2]).await;
    assert_eq!(waiting["queue_position"], 1, "{waiting}");
    // Both slots busy, two epochs in.
    let deadline = Instant::now() + Duration::from_secs(300);
    let before: Vec<Vec<(u64, String)>> = loop {
        let mut recorded = Vec::new();
        for id in &ids[..2] {
            recorded.push(support::recorded_epochs(&http, &first, id).await);
        }
        if recorded.iter().all(|r| r.len() >= 2) {
            break recorded;
        }
        assert!(Instant::now() < deadline, "the jobs never got going");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The leader dies.
    first.kill().await;
    let killed = Instant::now();
    while !leads(&http, &second.url).await {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no backend took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took_over = killed.elapsed();
    eprintln!("the second backend led {took_over:?} after the first was killed");

    // Everything finishes on the survivor.
    let deadline = Instant::now() + Duration::from_secs(600);
    let finished: Vec<Value> = loop {
        let mut jobs = Vec::new();
        for id in &ids {
            jobs.push(job(&http, &second.url, id).await);
        }
        if jobs.iter().all(|j| {
            matches!(
                j["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        }) {
            break jobs;
        }
        assert!(Instant::now() < deadline, "not finished: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for job in &finished {
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["attempt"], 1, "launched once: {job}");
        assert_eq!(job["attempts"], json!([]), "no attempt was lost: {job}");
    }
    for (id, before) in ids.iter().zip(&before) {
        let after = support::recorded_epochs(&http, &second, id).await;
        assert_eq!(
            after.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
            (1..=u64::from(epochs)).collect::<Vec<_>>(),
            "every epoch once"
        );
        for (epoch, recorded_at) in before {
            assert_eq!(
                &after[usize::try_from(*epoch).unwrap() - 1].1,
                recorded_at,
                "epoch {epoch} was trained again"
            );
        }
    }
}
