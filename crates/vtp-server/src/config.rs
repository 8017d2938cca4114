//! Backend configuration from flags and `VTP_*` variables, with defaults
//! that run on one machine with nothing installed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use vtp_core::{Error, JobStore, Result, TrainerLauncher};

use crate::auth::AuthMode;

/// Which launcher starts trainers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LauncherKind {
    /// The trainer service as a child process on loopback (tier 1).
    Subprocess,
    /// A trainer service reached over HTTP (`--trainer-url`).
    Http,
    /// Each job as a Kubernetes Job (tiers 2 and 3; `VTP_K8S_*`, in-cluster
    /// or from a kubeconfig).
    Kubernetes,
}

/// `vtp-backend`'s settings.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "vtp-backend",
    version,
    about = "VTP backend API: jobs, datasets, callbacks and checkpoints",
    after_help = "Logs go to stderr, filtered by VTP_LOG (a tracing filter such as `info,vtp_server=debug`; default `info`), as text or, with VTP_LOG_FORMAT=json, one JSON object per line with the request and job ids of its spans."
)]
pub struct BackendConfig {
    /// Address to listen on.
    #[arg(long, env = "VTP_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// Job store: `sqlite://path`, `postgres://...` or `memory://`.
    #[arg(long, env = "VTP_DATABASE_URL", default_value = vtp_storage::DEFAULT_DATABASE_URL)]
    pub database_url: String,

    /// Blob store: `file://dir`, `s3://bucket[/prefix]` (with the S3
    /// settings below) or `memory://`.
    #[arg(long, env = vtp_storage::blob_store::env::BLOB_URL, default_value = vtp_storage::DEFAULT_BLOB_URL)]
    pub blob_url: String,

    /// How to reach an S3 blob store; a trainer this backend starts gets
    /// the same settings (a Kubernetes pod only those that are not secret:
    /// its credentials come from `VTP_K8S_S3_SECRET`).
    #[command(flatten)]
    pub s3: vtp_storage::S3Settings,

    /// The Kubernetes launcher's settings.
    #[cfg(feature = "kubernetes")]
    #[command(flatten)]
    pub k8s: vtp_trainer::K8sArgs,

    /// Where traces go; a trainer this backend starts exports to the same
    /// collector.
    #[command(flatten)]
    pub telemetry: vtp_http::TelemetryArgs,

    /// How trainers are started.
    #[arg(long, env = "VTP_LAUNCHER", value_enum, default_value = "subprocess")]
    pub launcher: LauncherKind,

    /// The `vtp-trainer-service` binary, for the `subprocess` launcher;
    /// defaults to the one next to this executable.
    #[arg(long, env = "VTP_TRAINER_BIN")]
    pub trainer_bin: Option<std::path::PathBuf>,

    /// Trainer service base URL, for the `http` launcher.
    #[arg(long, env = "VTP_TRAINER_URL", default_value = "http://127.0.0.1:8001")]
    pub trainer_url: String,

    /// Base URL trainers use to reach this backend (callback URLs are built
    /// from it); defaults to `http://<listen address>`.
    #[arg(long, env = "VTP_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Largest dataset upload, in bytes.
    #[arg(long, env = "VTP_MAX_UPLOAD_BYTES", default_value_t = 10 * 1024 * 1024 * 1024)]
    pub max_upload_bytes: u64,

    /// A job queued this many seconds without its trainer starting fails;
    /// one cancelling that long without the trainer confirming is marked
    /// cancelled (within two minutes at most). Running jobs have leases
    /// instead (`VTP_HEARTBEAT_SECS`).
    #[arg(long, env = "VTP_STALE_AFTER_SECS", default_value_t = 3600)]
    pub stale_after_secs: u64,

    /// Trainers report at least this often, in seconds (with step progress
    /// inside an epoch); a running job silent for four periods has lost its
    /// runner, which is stopped, and the job is relaunched or failed.
    #[arg(long, env = vtp_core::launcher::HEARTBEAT_ENV, default_value_t = vtp_core::launcher::DEFAULT_HEARTBEAT_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_secs: u64,

    /// Seconds between passes of the Kubernetes reconciler, which ends jobs
    /// whose Job failed, vanished or cannot start.
    #[arg(long, env = "VTP_K8S_RECONCILE_SECS", default_value_t = 10)]
    pub reconcile_secs: u64,

    /// `tokens`: every request needs `Authorization: Bearer <token>`; `off`:
    /// one local user, refused on a non-loopback address. Defaults to off on
    /// loopback and tokens anywhere else.
    #[arg(long, env = "VTP_AUTH", value_enum)]
    pub auth: Option<AuthMode>,

    /// Token to send to the trainer service (`http` launcher); the trainer
    /// service is started with the same `VTP_TRAINER_TOKEN`.
    #[arg(long, env = "VTP_TRAINER_TOKEN", hide_env_values = true)]
    pub trainer_token: Option<String>,

    /// Job creations per user per minute (with tokens); more get 429.
    #[arg(long, env = "VTP_RATE_CREATES_PER_MINUTE", default_value_t = 60)]
    pub creates_per_minute: u32,

    /// Dataset uploads per user per minute (with tokens); more get 429.
    #[arg(long, env = "VTP_RATE_UPLOADS_PER_MINUTE", default_value_t = 30)]
    pub uploads_per_minute: u32,

    /// A user's jobs that may be active at once (with tokens); another start gets 429.
    #[arg(long, env = "VTP_MAX_ACTIVE_JOBS_PER_USER", default_value_t = 8)]
    pub max_active_jobs: u32,

    /// Largest job `config`, in bytes of JSON.
    #[arg(long, env = "VTP_MAX_CONFIG_BYTES", default_value_t = 64 * 1024)]
    pub max_config_bytes: usize,

    /// Administration instead of serving.
    #[command(subcommand)]
    pub command: Option<BackendCommand>,
}

/// `vtp-backend` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BackendCommand {
    /// API tokens in the job store's database.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `vtp-backend token ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokenCommand {
    /// Makes a token and prints it once; only its hash is stored.
    Create {
        /// The user the token acts for (owner of what it creates).
        #[arg(long)]
        user: String,
        /// The token may see and act on every user's objects.
        #[arg(long)]
        admin: bool,
    },
    /// Revokes a token by its id (`tok_...`, from `create` or `list`).
    Revoke {
        /// The token's id.
        id: String,
    },
    /// Lists tokens (ids, users, state; never the tokens).
    List,
}

impl BackendConfig {
    /// The base URL trainers call back on.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let mut addr = self.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{addr}")
            }
        }
    }

    /// The per-user limits.
    pub fn limits(&self) -> crate::limits::LimitSettings {
        crate::limits::LimitSettings {
            creates_per_minute: self.creates_per_minute,
            uploads_per_minute: self.uploads_per_minute,
            max_active_jobs: self.max_active_jobs,
            max_config_bytes: self.max_config_bytes,
        }
    }

    /// The authentication mode in force: as configured, else by address.
    pub fn auth_mode(&self) -> AuthMode {
        self.auth
            .unwrap_or_else(|| AuthMode::default_for(self.listen))
    }

    /// How long a job may go without a report.
    pub fn stale_after(&self) -> Duration {
        Duration::from_secs(self.stale_after_secs)
    }

    /// How often trainers report at least.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }

    /// Builds the configured launcher. The subprocess trainer shares the
    /// backend's blob store (`blob_uri`, the store's resolved root) and works
    /// under `./.vtp/trainer`. The Kubernetes launcher reconciles once (so
    /// jobs that ended while the backend was down get their reasons) and then
    /// every `reconcile_secs` in a background task.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad trainer URL or `VTP_K8S_*` setting;
    /// [`Error::Unavailable`] when no Kubernetes configuration is found.
    pub async fn build_launcher(
        &self,
        jobs: Arc<dyn JobStore>,
        blob_uri: &str,
    ) -> Result<Arc<dyn TrainerLauncher>> {
        match self.launcher {
            LauncherKind::Http => {
                let mut launcher = vtp_trainer::HttpLauncher::new(&self.trainer_url)?;
                if let Some(token) = &self.trainer_token {
                    launcher = launcher.with_token(token);
                }
                Ok(Arc::new(launcher))
            }
            LauncherKind::Subprocess => {
                let program = self
                    .trainer_bin
                    .clone()
                    .unwrap_or_else(vtp_trainer::SubprocessLauncher::sibling_binary);
                let blob_url = if self.blob_url.starts_with("file://") {
                    blob_uri.to_owned()
                } else {
                    self.blob_url.clone()
                };
                // The child inherits `VTP_S3_*` from this process's
                // environment; settings given as flags reach it the same
                // way (in its environment, never on its command line).
                let mut launcher = vtp_trainer::SubprocessLauncher::new(program, jobs);
                for (name, value) in self.s3.public_env().into_iter().chain(self.telemetry.env()) {
                    launcher = launcher.with_env(name, value);
                }
                for (name, value) in [
                    (
                        vtp_storage::blob_store::env::S3_ACCESS_KEY_ID,
                        &self.s3.access_key_id,
                    ),
                    (
                        vtp_storage::blob_store::env::S3_SECRET_ACCESS_KEY,
                        &self.s3.secret_access_key,
                    ),
                ] {
                    if let Some(value) = value {
                        launcher = launcher.with_env(name, value.clone());
                    }
                }
                Ok(Arc::new(
                    launcher
                        .with_env("VTP_BLOB_URL", blob_url)
                        // Reports may go only to this backend.
                        .with_env("VTP_BACKEND_URL", self.public_url())
                        .with_env(
                            "VTP_WORK_DIR",
                            std::env::var("VTP_WORK_DIR")
                                .unwrap_or_else(|_| "./.vtp/trainer".into()),
                        ),
                ))
            }
            #[cfg(not(feature = "kubernetes"))]
            LauncherKind::Kubernetes => Err(Error::invalid(
                "launcher",
                "this build has no Kubernetes launcher; rebuild vtp-server with the `kubernetes` feature",
            )),
            #[cfg(feature = "kubernetes")]
            LauncherKind::Kubernetes => {
                let mut trainer_env = vec![("VTP_BLOB_URL".to_owned(), self.blob_url.clone())];
                trainer_env.extend(self.s3.public_env());
                trainer_env.extend(self.telemetry.env());
                let launcher =
                    vtp_trainer::KubernetesLauncher::connect(self.k8s.config(trainer_env)?, jobs)
                        .await?;
                match launcher.reconcile().await {
                    Ok(done) => tracing::info!(
                        running = done.running,
                        ended = done.ended.len(),
                        "reconciled Kubernetes Jobs"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %vtp_core::error_chain(&e), "first reconcile failed; the loop retries")
                    }
                }
                tokio::spawn(
                    launcher
                        .clone()
                        .run_reconciler(Duration::from_secs(self.reconcile_secs.max(1))),
                );
                Ok(Arc::new(launcher))
            }
        }
    }

    /// Checks the settings that parsing alone cannot.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        let public = self.public_url();
        if !(public.starts_with("http://") || public.starts_with("https://")) {
            return Err(Error::invalid(
                "public_url",
                format!("{public:?} is not an http(s) URL"),
            ));
        }
        if self.max_upload_bytes == 0 {
            return Err(Error::invalid("max_upload_bytes", "must be positive"));
        }
        if self.auth_mode() == AuthMode::Off && !self.listen.ip().is_loopback() {
            return Err(Error::invalid(
                "auth",
                format!(
                    "refusing to serve without authentication on {}; set VTP_AUTH=tokens \
                     (and make tokens with `vtp-backend token create`) or listen on 127.0.0.1",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_run_on_one_machine() {
        let config = BackendConfig::try_parse_from(["vtp-backend"]).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8000");
        assert!(config.database_url.starts_with("sqlite://"));
        assert!(config.blob_url.starts_with("file://"));
        assert_eq!(config.public_url(), "http://127.0.0.1:8000");
        assert_eq!(config.auth_mode(), AuthMode::Off);
        config.validate().unwrap();
    }

    #[test]
    fn auth_is_on_beyond_loopback_and_cannot_be_turned_off_there() {
        let config =
            BackendConfig::try_parse_from(["vtp-backend", "--listen", "0.0.0.0:8000"]).unwrap();
        assert_eq!(config.auth_mode(), AuthMode::Tokens);
        config.validate().unwrap();
        let config = BackendConfig::try_parse_from([
            "vtp-backend",
            "--listen",
            "0.0.0.0:8000",
            "--auth",
            "off",
        ])
        .unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("refusing to serve"), "{err}");
        let config = BackendConfig::try_parse_from(["vtp-backend", "--auth", "tokens"]).unwrap();
        assert_eq!(config.auth_mode(), AuthMode::Tokens);
        let config = BackendConfig::try_parse_from([
            "vtp-backend",
            "token",
            "create",
            "--user",
            "alice",
            "--admin",
        ])
        .unwrap();
        assert!(matches!(
            config.command,
            Some(BackendCommand::Token(TokenCommand::Create { ref user, admin: true })) if user == "alice"
        ));
    }

    #[test]
    fn flags_override() {
        let config = BackendConfig::try_parse_from([
            "vtp-backend",
            "--listen",
            "0.0.0.0:9000",
            "--public-url",
            "http://backend.svc:9000/",
        ])
        .unwrap();
        assert_eq!(config.public_url(), "http://backend.svc:9000");
        let config =
            BackendConfig::try_parse_from(["vtp-backend", "--listen", "0.0.0.0:9000"]).unwrap();
        assert_eq!(config.public_url(), "http://127.0.0.1:9000");
        assert!(
            BackendConfig::try_parse_from(["vtp-backend", "--launcher", "carrier-pigeon"]).is_err()
        );
    }
}
