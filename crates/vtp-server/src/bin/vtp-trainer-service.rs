//! `vtp-trainer-service`: trains jobs handed to it over HTTP with libtorch,
//! reading datasets from and writing checkpoints to the blob store
//! (`VTP_BLOB_URL`, `VTP_S3_*`), reporting to each job's callback URL.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use vtp_storage::BlobStoreBuilder;
use vtp_trainer::service::TrainerService;

/// `vtp-trainer-service`'s settings.
#[derive(Debug, Parser)]
#[command(
    name = "vtp-trainer-service",
    version,
    about = "VTP trainer service: trains image classifiers with libtorch"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "VTP_TRAINER_LISTEN", default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    /// Blob store holding datasets and checkpoints.
    #[arg(long, env = "VTP_BLOB_URL", default_value = vtp_storage::DEFAULT_BLOB_URL)]
    blob_url: String,
    /// Scratch space: datasets, checkpoints in progress, the report outbox.
    #[arg(long, env = "VTP_WORK_DIR", default_value = "./.vtp/trainer")]
    work_dir: PathBuf,
    /// Jobs trained at once; the rest wait.
    #[arg(long, env = "VTP_TRAINER_CONCURRENCY", default_value_t = 1)]
    concurrency: usize,
    /// Exit when the parent process exits (the subprocess launcher sets it).
    #[arg(long)]
    exit_with_parent: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    vtp_server::init_tracing();
    let args = Args::parse();
    let blobs = BlobStoreBuilder::from_env()
        .with_url(args.blob_url.clone())
        .build()
        .with_context(|| format!("opening the blob store at {}", args.blob_url))?;
    let service = TrainerService::new(blobs, &args.work_dir, args.concurrency)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let bound = listener.local_addr()?;
    println!(
        "{}http://{bound}",
        vtp_trainer::launch::subprocess::LISTENING_PREFIX
    );
    tracing::info!(listen = %bound, blobs = %service.blobs().base_uri(), "vtp-trainer-service ready");
    let exit_with_parent = args.exit_with_parent;
    vtp_server::trainer_service::serve_trainer(listener, service, async move {
        if exit_with_parent {
            vtp_server::parent_exited().await;
        } else {
            vtp_server::shutdown_signal().await;
        }
    })
    .await?;
    Ok(())
}
