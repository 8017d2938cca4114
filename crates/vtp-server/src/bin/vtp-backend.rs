//! `vtp-backend`: the VTP backend API. Configuration comes from flags and
//! `VTP_*` variables (`vtp-backend --help`); the defaults run on one machine
//! with SQLite and local disk under `./.vtp/`.

use anyhow::Context;
use clap::Parser;
use vtp_server::{AppState, BackendConfig};
use vtp_storage::BlobStoreBuilder;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    vtp_server::init_tracing();
    let mut config = BackendConfig::parse();
    config.validate()?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let bound = listener.local_addr()?;
    // With `--listen 127.0.0.1:0` callback URLs must carry the real port.
    config.listen = bound;

    let jobs = vtp_storage::connect_job_store(&config.database_url)
        .await
        .with_context(|| format!("opening the job store at {}", config.database_url))?;
    let blobs = BlobStoreBuilder::from_env()
        .with_url(config.blob_url.clone())
        .build()
        .with_context(|| format!("opening the blob store at {}", config.blob_url))?;
    let launcher = config
        .build_launcher(jobs.clone(), blobs.base_uri())
        .await?;
    let state = AppState::new(jobs, blobs, launcher, config.public_url())
        .with_max_upload_bytes(config.max_upload_bytes);

    match vtp_server::recover(&state).await {
        Ok((adopted, ended)) if adopted + ended > 0 => {
            tracing::info!(adopted, ended, "recovered jobs of an earlier run")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %vtp_core::error_chain(&e), "could not recover earlier jobs")
        }
    }
    // One plain line on stdout, so scripts and tests can find a `:0` port.
    println!("vtp-backend listening on http://{bound}");
    tracing::info!(
        listen = %bound,
        database = %redact(&config.database_url),
        blobs = %state.blobs.base_uri(),
        launcher = state.launcher.name(),
        "vtp-backend ready"
    );
    vtp_server::serve(
        listener,
        state,
        config.stale_after(),
        vtp_server::shutdown_signal(),
    )
    .await?;
    tracing::info!("vtp-backend stopped");
    Ok(())
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
