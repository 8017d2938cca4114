//! `vtp-trainer-service`: trains jobs handed to it over HTTP with libtorch
//! ([`vtp_trainer::TchEngine`] behind [`vtp_trainer::service`]), reading
//! datasets from and writing checkpoints to the blob store (`VTP_BLOB_URL`,
//! `VTP_S3_*`), reporting to each job's callback URL.
//!
//! `vtp-trainer-service run-job` is the one-shot form a Kubernetes Job runs:
//! it trains the request in `VTP_START_TRAINING`, delivers every report,
//! and exits 0 (completed or cancelled), 3 (the job can never succeed as
//! given: the Job's pod failure policy stops retrying) or 1 (worth a retry).
//!
//! SIGTERM (a drain, an eviction, a deadline, the backend deleting the Job
//! of a cancelled job) stops training at the next step. The service form
//! reports a retryable failure naming the interruption for each job, and the
//! backend relaunches it from the checkpoint set stored after its last whole
//! epoch (or, when its owner was cancelling it, marks it cancelled). The
//! one-shot form only reports the interruption: the Job replaces a pod
//! evicted or drained (its failure policy ignores disruptions), the new pod
//! resumes from the newest stored set, and a job cancelled or past its
//! deadline is settled by the backend's reconciler. While it works, a job
//! reports at least every `VTP_HEARTBEAT_SECS` (the start request's period
//! wins), so the backend's lease on it stays fresh.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vtp_core::launcher::{
    CALLBACK_SECRET_ENV, EXIT_NON_RETRYABLE, LISTENING_PREFIX, START_TRAINING_ENV,
};
use vtp_core::{JobStatus, StartTraining};
use vtp_storage::{BlobStoreBuilder, S3Settings};
use vtp_trainer::TchEngine;
use vtp_trainer::service::{ServiceOptions, TrainerService};

/// `vtp-trainer-service`'s settings.
#[derive(Debug, Parser)]
#[command(
    name = "vtp-trainer-service",
    version,
    about = "VTP trainer service: trains image classifiers and detectors with libtorch",
    after_help = "Logs go to stderr, filtered by VTP_LOG (a tracing filter such as `info,vtp_server=debug`; default `info`), as text or, with VTP_LOG_FORMAT=json, one JSON object per line with the request and job ids of its spans."
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "VTP_TRAINER_LISTEN", default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    /// Blob store holding datasets and checkpoints: `file://dir`,
    /// `s3://bucket[/prefix]` (with the S3 settings below) or `memory://`.
    #[arg(long, env = vtp_storage::blob_store::env::BLOB_URL, default_value = vtp_storage::DEFAULT_BLOB_URL)]
    blob_url: String,
    #[command(flatten)]
    s3: S3Settings,
    /// Where traces go.
    #[command(flatten)]
    telemetry: vtp_http::TelemetryArgs,
    /// Scratch space: datasets, checkpoints in progress, the report outbox.
    #[arg(long, env = "VTP_WORK_DIR", default_value = "./.vtp/trainer")]
    work_dir: PathBuf,
    /// Jobs trained at once; the rest wait.
    #[arg(long, env = "VTP_TRAINER_CONCURRENCY", default_value_t = 1)]
    concurrency: usize,
    /// Jobs that may wait for a training slot; one more is refused with 429.
    #[arg(long, env = "VTP_TRAINER_MAX_WAITING", default_value_t = 64)]
    max_waiting: usize,
    /// The backend's base URL: reports go only to its origin, and a start
    /// request with a callback URL elsewhere is refused.
    #[arg(long, env = "VTP_BACKEND_URL", default_value = "http://127.0.0.1:8000")]
    backend_url: String,
    /// Token the backend must send (`Authorization: Bearer`); required when
    /// listening beyond loopback.
    #[arg(long, env = "VTP_TRAINER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The job's callback secret, for `run-job` (from the job's Kubernetes
    /// Secret; never in the request JSON of a pod spec).
    #[arg(long, env = CALLBACK_SECRET_ENV, hide_env_values = true)]
    callback_secret: Option<String>,
    /// Exit when the parent process exits (the subprocess launcher sets it).
    #[arg(long)]
    exit_with_parent: bool,
    /// Report at least this often while a job works, in seconds, when its
    /// start request names no period.
    #[arg(long, env = vtp_core::launcher::HEARTBEAT_ENV, default_value_t = vtp_core::launcher::DEFAULT_HEARTBEAT_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat_secs: u64,
    /// The most bytes a dataset archive may unpack to (a Kubernetes pod is
    /// told its disk's share).
    #[arg(long, env = "VTP_MAX_UNPACKED_BYTES", default_value_t = vtp_trainer::data::archive::MAX_UNPACKED_BYTES)]
    max_unpacked_bytes: u64,
    /// How long the upload of a trained model retries an outage before the
    /// attempt fails (and is relaunched from its last checkpoint set), in
    /// seconds.
    #[arg(long, env = "VTP_UPLOAD_RETRY_SECS", default_value_t = 1800)]
    upload_retry_secs: u64,
    /// The Python that `python` jobs' scripts run with. Default: the
    /// active virtual environment's (`$VIRTUAL_ENV/bin/python`), else
    /// `python3` on the PATH.
    #[arg(long, env = "VTP_TRAINER_PYTHON")]
    python: Option<std::path::PathBuf>,
    /// More of this service's environment variables a script may see,
    /// comma-separated: exact names, or prefixes ending in `_`.
    #[arg(long, env = "VTP_TRAINER_SCRIPT_ENV", value_delimiter = ',')]
    script_env: Vec<String>,
    /// Seconds a script may go without a report, step or checkpoint before
    /// it is stopped as hung, when its config names no
    /// `report_timeout_secs`.
    #[arg(long, env = "VTP_TRAINER_SCRIPT_TIMEOUT_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    script_timeout_secs: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trains one job to the end and exits (the Kubernetes Job's command).
    RunJob {
        /// The `POST /training/start` body, as JSON (from the job's
        /// Kubernetes Secret; not shown here).
        #[arg(long, env = START_TRAINING_ENV, hide_env_values = true)]
        request: String,
        /// Longest wait for the backend to take the last reports, in seconds.
        #[arg(long, env = "VTP_REPORT_DRAIN_SECS", default_value_t = 300)]
        drain_secs: u64,
        /// This pod's machine in a run across several: its completion index
        /// in the Indexed Job (Kubernetes sets it).
        #[arg(long, env = "JOB_COMPLETION_INDEX", requires = "master_addr")]
        node_rank: Option<u32>,
        /// Where machine 0 of a run across several is reached (its pod's
        /// name under the attempt's headless Service).
        #[arg(long, env = vtp_core::launcher::MASTER_ADDR_ENV)]
        master_addr: Option<String>,
        /// Machine 0's rendezvous port.
        #[arg(long, env = vtp_core::launcher::MASTER_PORT_ENV, default_value_t = vtp_core::launcher::RENDEZVOUS_PORT)]
        master_port: u16,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Dropped before every exit: it exports the last spans.
    let telemetry = vtp_http::init_tracing("vtp-trainer-service", &args.telemetry)
        .map_err(|e| anyhow::anyhow!(vtp_core::error_chain(&e)))?;
    let blobs = BlobStoreBuilder::new()
        .with_url(args.blob_url.clone())
        .with_s3(args.s3.clone())
        .build()
        .with_context(|| format!("opening the blob store at {}", args.blob_url))?;
    let options = ServiceOptions {
        concurrency: args.concurrency,
        max_waiting: args.max_waiting,
        backend_url: args.backend_url.clone(),
        heartbeat: Duration::from_secs(args.heartbeat_secs),
        replaced_on_interrupt: false,
        upload_budget: Duration::from_secs(args.upload_retry_secs),
        archive_limits: vtp_trainer::data::archive::ArchiveLimits {
            max_bytes: args.max_unpacked_bytes,
            ..Default::default()
        },
        script: vtp_trainer::service::script::ScriptOptions {
            python: args
                .python
                .clone()
                .unwrap_or_else(vtp_trainer::service::script::default_python),
            extra_env: args.script_env.clone(),
            report_timeout: Duration::from_secs(args.script_timeout_secs),
            ..Default::default()
        },
    };
    if let Some(Command::RunJob {
        request,
        drain_secs,
        node_rank,
        master_addr,
        master_port,
    }) = &args.command
    {
        let mut options = options;
        if let (Some(rank), Some(master_addr)) = (node_rank, master_addr) {
            options.script.node = Some(vtp_trainer::service::script::Node {
                rank: *rank,
                master_addr: master_addr.clone(),
                master_port: *master_port,
            });
        }
        let service = TrainerService::with_options(
            Arc::new(TchEngine),
            blobs,
            &args.work_dir,
            ServiceOptions {
                concurrency: 1,
                // The Job re-creates a pod evicted or drained.
                replaced_on_interrupt: true,
                ..options
            },
        )?;
        let code = run_job(
            service,
            request,
            args.callback_secret.as_deref(),
            Duration::from_secs(*drain_secs),
        )
        .await;
        drop(telemetry);
        std::process::exit(code);
    }
    if args.token.is_none() && !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {} without VTP_TRAINER_TOKEN: anyone reaching it could start jobs",
            args.listen
        );
    }
    let service =
        TrainerService::with_options(Arc::new(TchEngine), blobs, &args.work_dir, options)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let bound = listener.local_addr()?;
    println!("{}http://{bound}", LISTENING_PREFIX);
    tracing::info!(listen = %bound, blobs = %service.blobs().base_uri(), "vtp-trainer-service ready");
    let exit_with_parent = args.exit_with_parent;
    let held = service.clone();
    vtp_trainer::service::http::serve_trainer(listener, service, args.token.clone(), async move {
        if exit_with_parent {
            vtp_http::parent_exited().await;
        } else {
            vtp_http::shutdown_signal().await;
        }
    })
    .await?;
    // Going away (the backend that started this child is gone, or SIGTERM):
    // stop rather than train on. Jobs under way report a retryable failure
    // and resume from their last stored checkpoint sets when the backend
    // relaunches them; reports not delivered now stay in the outbox for
    // the next process that opens it (stale by then, and harmless).
    // Training threads are stopped first: libtorch must not be torn down
    // under them.
    let interrupted = held.interrupt_all();
    if interrupted > 0 {
        tracing::warn!(
            jobs = interrupted,
            "stopping; jobs under way resume when relaunched"
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while !held.jobs().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let outbox = held.outbox().clone();
    let delivery = tokio::spawn({
        let outbox = outbox.clone();
        async move { outbox.run().await }
    });
    outbox.drained(Duration::from_secs(5)).await;
    delivery.abort();
    drop(telemetry);
    std::process::exit(0);
}

/// The one-shot trainer: trains `request`, waits for its reports to be
/// delivered, and returns the process exit code.
async fn run_job(
    service: Arc<TrainerService>,
    request: &str,
    callback_secret: Option<&str>,
    drain: Duration,
) -> i32 {
    let mut request: StartTraining = match serde_json::from_str(request) {
        Ok(request) => request,
        Err(e) => {
            tracing::error!(error = %e, "{START_TRAINING_ENV} is not a start request");
            return EXIT_NON_RETRYABLE;
        }
    };
    if let Some(secret) = callback_secret {
        match vtp_core::CallbackSecret::parse(secret) {
            Ok(secret) => request.callback_secret = Some(secret),
            Err(e) => {
                tracing::error!(error = %e, "{CALLBACK_SECRET_ENV} is malformed");
                return EXIT_NON_RETRYABLE;
            }
        }
    }
    let job_id = request.job_id;
    // A retried pod starts with an empty outbox: number its reports above
    // any an earlier attempt sent, so the backend does not take them for replays.
    let floor = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            i64::try_from(d.as_millis() * 1000).unwrap_or(i64::MAX)
        });
    if let Err(e) = service.outbox().raise_seq_floor(job_id, floor) {
        tracing::error!(%job_id, error = %vtp_core::error_chain(&e), "cannot prepare the outbox");
        return 1;
    }
    let outbox = service.outbox().clone();
    let delivery = tokio::spawn(async move { outbox.run().await });
    let cancel = {
        let service = service.clone();
        tokio::spawn(async move {
            vtp_http::shutdown_signal().await;
            tracing::info!(%job_id, "termination requested; stopping the job at its next step");
            service.interrupt_all();
        })
    };
    let code = match service.run_once(request).await {
        Ok(finished) => match finished.status {
            JobStatus::Completed | JobStatus::Cancelled => 0,
            _ if finished.retryable => 1,
            _ => EXIT_NON_RETRYABLE,
        },
        Err(e) if e.is_retryable() => 1,
        Err(_) => EXIT_NON_RETRYABLE,
    };
    let drained = tokio::time::timeout(drain, async {
        while service.outbox().has_pending(job_id) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(%job_id, "reports still undelivered; the backend's reconciler will settle the job");
    }
    cancel.abort();
    delivery.abort();
    tracing::info!(%job_id, code, "one-shot trainer done");
    code
}
