//! HttpLauncher against the trainer double: the seed's start and cancel
//! contract, retries on transient failures, clear errors on refusals.

use std::time::Duration;

use vtp_core::{
    BackoffConfig, CancelOutcome, Error, JobId, RetryConfig, StartTraining, TrainerLauncher,
};
use vtp_launch::HttpLauncher;
use vtp_trainer::testing::TrainerDouble;

fn request(job_id: JobId) -> StartTraining {
    StartTraining {
        framework: "tch".into(),
        job_id,
        config: serde_json::json!({"model": "resnet18", "epochs": 3, "lr": 0.01}),
        dataset_s3_uri: "s3://vtp/users/alice/datasets/digits/digits.zip".into(),
        callback_url: "http://127.0.0.1:8000/training/jobs/x/callback".into(),
        callback_secret: Some(
            vtp_core::CallbackSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap(),
        ),
        attempt: 1,
        resume_from: None,
        heartbeat_secs: Some(30),
        dataset_bytes: None,
        traceparent: None,
    }
}

fn fast_retry(max_retries: usize) -> RetryConfig {
    RetryConfig {
        max_retries,
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            base: 2.0,
        },
        timeout: Duration::from_secs(10),
    }
}

#[tokio::test]
async fn launch_posts_the_seed_body() {
    let trainer = TrainerDouble::start().await;
    let launcher = HttpLauncher::new(&trainer.url()).unwrap();
    assert_eq!(launcher.name(), "http");
    let job_id = JobId::new();
    launcher.launch(&request(job_id)).await.unwrap();
    assert_eq!(trainer.started(), vec![request(job_id)]);
}

#[tokio::test]
async fn launch_twice_adopts_the_running_job() {
    let trainer = TrainerDouble::start().await;
    let launcher = HttpLauncher::new(&trainer.url()).unwrap();
    let job_id = JobId::new();
    launcher.launch(&request(job_id)).await.unwrap();
    launcher.launch(&request(job_id)).await.unwrap();
    assert_eq!(
        trainer.started().len(),
        2,
        "the second start reached the trainer and was answered 409"
    );
}

#[tokio::test]
async fn transient_failures_are_retried() {
    let trainer = TrainerDouble::start().await;
    trainer.fail_next(503, "warming up");
    trainer.fail_next(500, "hiccup");
    let launcher = HttpLauncher::new(&trainer.url())
        .unwrap()
        .with_retry(fast_retry(3));
    launcher.launch(&request(JobId::new())).await.unwrap();
    assert_eq!(trainer.started().len(), 1);
}

#[tokio::test]
async fn retries_run_out_with_the_trainer_message() {
    let trainer = TrainerDouble::start().await;
    for _ in 0..3 {
        trainer.fail_next(503, "out of GPUs");
    }
    let launcher = HttpLauncher::new(&trainer.url())
        .unwrap()
        .with_retry(fast_retry(2));
    let err = launcher.launch(&request(JobId::new())).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    let chain = format!("{err:?}");
    assert!(chain.contains("out of GPUs"), "{chain}");
}

#[tokio::test]
async fn refused_config_is_invalid_input_with_the_message() {
    let trainer = TrainerDouble::start().await;
    trainer.fail_next(422, "unknown model \"resnet9000\"");
    let launcher = HttpLauncher::new(&trainer.url())
        .unwrap()
        .with_retry(fast_retry(3));
    let err = launcher.launch(&request(JobId::new())).await.unwrap_err();
    match err {
        Error::InvalidInput { field, message } => {
            assert_eq!(field, "config");
            assert!(message.contains("resnet9000"), "{message}");
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert!(trainer.started().is_empty(), "a refusal is not retried");
}

#[tokio::test]
async fn unreachable_trainer_is_unavailable() {
    let trainer = TrainerDouble::start().await;
    let url = trainer.url();
    drop(trainer);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let launcher = HttpLauncher::new(&url).unwrap().with_retry(fast_retry(1));
    let err = launcher.launch(&request(JobId::new())).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                service: "trainer",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn cancel_signals_running_and_reports_unknown() {
    let trainer = TrainerDouble::start().await;
    let launcher = HttpLauncher::new(&trainer.url()).unwrap();
    let job_id = JobId::new();
    launcher.launch(&request(job_id)).await.unwrap();
    assert_eq!(
        launcher.cancel(job_id).await.unwrap(),
        CancelOutcome::Signalled
    );
    assert_eq!(
        launcher.cancel(job_id).await.unwrap(),
        CancelOutcome::NotRunning
    );
    assert_eq!(trainer.cancelled(), vec![job_id, job_id]);
}

#[test]
fn base_urls_are_checked_and_joined() {
    assert!(matches!(
        HttpLauncher::new("ftp://x").unwrap_err(),
        Error::InvalidInput { .. }
    ));
    assert!(matches!(
        HttpLauncher::new("not a url").unwrap_err(),
        Error::InvalidInput { .. }
    ));
    let launcher = HttpLauncher::new("http://trainer:8001/api").unwrap();
    assert_eq!(launcher.base_url().as_str(), "http://trainer:8001/api/");
}
