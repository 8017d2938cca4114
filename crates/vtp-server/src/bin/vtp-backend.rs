//! `vtp-backend`: the VTP backend API. Configuration comes from flags and
//! `VTP_*` variables (`vtp-backend --help`); the defaults run on one machine
//! with SQLite and local disk under `./.vtp/`.

use anyhow::Context;
use clap::Parser;
use vtp_core::{CredentialStoreExt, error_chain};
use vtp_server::config::{BackendCommand, TokenCommand};
use vtp_server::{AppState, AuthMode, BackendConfig};
use vtp_storage::BlobStoreBuilder;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = BackendConfig::parse();
    // Held to the end of `main`: dropping it exports the last spans.
    let _telemetry = vtp_server::init_tracing("vtp-backend", &config.telemetry)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    // Fail points of the crash tests, from `FAILPOINTS` (built only with
    // the `failpoints` feature; see tests/tier2_e2e.rs).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    if let Some(BackendCommand::Token(command)) = &config.command {
        return token_command(&config, command).await;
    }
    config.validate()?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let bound = listener.local_addr()?;
    // With `--listen 127.0.0.1:0` callback URLs must carry the real port.
    config.listen = bound;

    let stores = vtp_storage::connect_stores(&config.database_url)
        .await
        .with_context(|| format!("opening the job store at {}", redact(&config.database_url)))?;
    let jobs = stores.jobs.clone();
    let blobs = BlobStoreBuilder::new()
        .with_url(config.blob_url.clone())
        .with_s3(config.s3.clone())
        .build()
        .with_context(|| format!("opening the blob store at {}", config.blob_url))?;
    let launcher = config
        .build_launcher(jobs.clone(), blobs.base_uri())
        .await?;
    let auth = config.auth_mode();
    let state = AppState::new(stores, blobs, launcher, config.public_url())
        .with_max_upload_bytes(config.max_upload_bytes)
        .with_user_code(config.user_code_allowed())
        .with_limits(config.limits())
        .with_heartbeat(config.heartbeat())
        .with_duties(config.duties())
        .with_auth(auth);
    if auth == AuthMode::Off {
        tracing::warn!(
            listen = %bound,
            "authentication is off (VTP_AUTH=off): one local user, loopback only; \
             set VTP_AUTH=tokens to share this backend"
        );
    }

    // Jobs of an earlier run are recovered by whichever backend leads
    // (this one, unless another shares the database).
    // One plain line on stdout, so scripts and tests can find a `:0` port.
    println!("vtp-backend listening on http://{bound}");
    tracing::info!(
        listen = %bound,
        database = %redact(&config.database_url),
        blobs = %state.blobs.base_uri(),
        launcher = state.launcher.name(),
        auth = ?auth,
        "vtp-backend ready"
    );
    vtp_server::serve_with(
        listener,
        state,
        config.serve_options(),
        vtp_server::shutdown_signal(),
    )
    .await?;
    tracing::info!("vtp-backend stopped");
    Ok(())
}

/// `vtp-backend token create|revoke|list`, against the configured database.
async fn token_command(config: &BackendConfig, command: &TokenCommand) -> anyhow::Result<()> {
    let stores = vtp_storage::connect_stores(&config.database_url)
        .await
        .with_context(|| format!("opening the job store at {}", redact(&config.database_url)))?;
    let credentials = stores.credentials;
    match command {
        TokenCommand::Create { user, admin } => {
            let token = credentials
                .create_token(user, *admin)
                .await
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
            eprintln!(
                "token {} for user {user}{}; shown once, only its hash is stored:",
                token.record.id,
                if *admin { " (admin)" } else { "" }
            );
            println!("{}", token.token);
        }
        TokenCommand::Revoke { id } => {
            let token = credentials
                .revoke_token(id)
                .await
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
            println!("revoked {} of user {}", token.id, token.user_id);
        }
        TokenCommand::List => {
            let tokens = credentials
                .list_tokens()
                .await
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
            println!(
                "{:<22} {:<24} {:<6} {:<26} revoked",
                "id", "user", "admin", "created"
            );
            for t in tokens {
                println!(
                    "{:<22} {:<24} {:<6} {:<26} {}",
                    t.id,
                    t.user_id,
                    t.admin,
                    t.created_at.to_rfc3339(),
                    t.revoked_at
                        .map_or_else(|| "-".to_owned(), |r| r.to_rfc3339())
                );
            }
        }
    }
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
