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

    /// Job store: `sqlite://path`, `postgres://...` or `memory://` (its
    /// value is not shown here: a Postgres URL may hold a password).
    #[arg(long, env = "VTP_DATABASE_URL", default_value = vtp_storage::DEFAULT_DATABASE_URL, hide_env_values = true)]
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
    pub k8s: vtp_launch::K8sArgs,

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

    /// A launched job whose trainer has not started this many seconds later
    /// has lost its runner (relaunched or failed); one cancelling that long
    /// without the trainer confirming is marked cancelled (within two
    /// minutes at most). A job waiting in the queue for capacity waits as
    /// long as it takes. Running jobs have leases instead
    /// (`VTP_HEARTBEAT_SECS`).
    #[arg(long, env = "VTP_STALE_AFTER_SECS", default_value_t = 3600)]
    pub stale_after_secs: u64,

    /// Jobs the launcher runs at once; the rest wait in the queue. Default:
    /// 1 for `subprocess` (the child trainer's concurrency), the trainer
    /// service's own for `http`, 8 for `kubernetes` (without Kueue, which
    /// admits jobs itself).
    #[arg(long, env = "VTP_MAX_RUNNING", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_running: Option<u32>,

    /// Finished jobs, with their checkpoints and metrics, are deleted this
    /// many days after they finished; 0 keeps them until their owner
    /// deletes them.
    #[arg(long, env = "VTP_RETENTION_DAYS", default_value_t = 0)]
    pub retention_days: u32,

    /// Seconds between the leader's retention passes, which also finish
    /// deletions cut short and remove uploads a crash left staged.
    #[arg(long, env = "VTP_RETENTION_INTERVAL_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub retention_interval_secs: u64,

    /// Trainers report at least this often, in seconds (with step progress
    /// inside an epoch); a running job silent for four periods has lost its
    /// runner, which is stopped, and the job is relaunched or failed.
    #[arg(long, env = vtp_core::launcher::HEARTBEAT_ENV, default_value_t = vtp_core::launcher::DEFAULT_HEARTBEAT_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_secs: u64,

    /// Seconds between passes of the Kubernetes reconciler (on the leading
    /// backend), which ends jobs whose Job failed, vanished or cannot start.
    #[arg(long, env = "VTP_K8S_RECONCILE_SECS", default_value_t = 10)]
    pub reconcile_secs: u64,

    /// `tokens`: every request needs `Authorization: Bearer <token>`; `off`:
    /// one local user, refused on a non-loopback address. Defaults to off on
    /// loopback and tokens anywhere else.
    #[arg(long, env = "VTP_AUTH", value_enum)]
    pub auth: Option<AuthMode>,

    /// Whether jobs may run their owner's own code (`framework: "python"`):
    /// a script is as trusted as the trainer's machine lets it be (see the
    /// README). Off by default with tokens on, on without (one local user).
    #[arg(long, env = "VTP_ALLOW_USER_CODE")]
    pub allow_user_code: Option<bool>,

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

    /// A user's jobs that may be created and not started (with tokens); another create gets 429.
    #[arg(long, env = "VTP_MAX_PENDING_JOBS_PER_USER", default_value_t = 64)]
    pub max_pending_jobs: u32,

    /// The highest `priority` (of -100..=100) a user who is not an admin
    /// may give a job; admins may give up to 100.
    #[arg(long, env = "VTP_MAX_USER_PRIORITY", default_value_t = 0, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-100..=100))]
    pub max_user_priority: i32,

    /// Event streams one user may hold open; another gets 429.
    #[arg(long, env = "VTP_MAX_STREAMS_PER_USER", default_value_t = 16)]
    pub max_streams_per_user: u32,

    /// Event streams open at once, all users together.
    #[arg(long, env = "VTP_MAX_EVENT_STREAMS", default_value_t = 1024)]
    pub max_event_streams: u32,

    /// The longest an event stream stays open, in seconds; the client
    /// reconnects with `Last-Event-ID` and misses nothing.
    #[arg(long, env = "VTP_STREAM_MAX_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_max_secs: u64,

    /// Uploads under way at once, all users together; another gets 429.
    #[arg(long, env = "VTP_MAX_CONCURRENT_UPLOADS", default_value_t = 8)]
    pub max_concurrent_uploads: u32,

    /// Uploads one user may have under way at once.
    #[arg(long, env = "VTP_MAX_CONCURRENT_UPLOADS_PER_USER", default_value_t = 2)]
    pub max_concurrent_uploads_per_user: u32,

    /// An upload that sends nothing for this many seconds is cut off (408).
    #[arg(long, env = "VTP_UPLOAD_IDLE_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub upload_idle_secs: u64,

    /// The longest one upload may take, in seconds (408 after).
    #[arg(long, env = "VTP_UPLOAD_MAX_SECS", default_value_t = 6 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub upload_max_secs: u64,

    /// A client must send a request's head within this many seconds, or
    /// its connection is closed.
    #[arg(long, env = "VTP_HEADER_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub header_timeout_secs: u64,

    /// Connections served at once; more wait to be accepted.
    #[arg(long, env = "VTP_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// Credential lookups (unrecognised tokens, reports for jobs not seen
    /// lately) one client address may cause per minute; more get 429
    /// before any database work.
    #[arg(long, env = "VTP_RATE_AUTH_LOOKUPS_PER_MINUTE", default_value_t = 120)]
    pub auth_lookups_per_minute: u32,

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
            max_pending_jobs: self.max_pending_jobs,
            max_user_priority: self.max_user_priority,
            streams_per_user: self.max_streams_per_user,
            max_streams: self.max_event_streams,
            stream_lifetime: Duration::from_secs(self.stream_max_secs),
            uploads_at_once: self.max_concurrent_uploads,
            uploads_per_user_at_once: self.max_concurrent_uploads_per_user,
            upload_idle: Duration::from_secs(self.upload_idle_secs),
            upload_total: Duration::from_secs(self.upload_max_secs),
            auth_lookups_per_minute: self.auth_lookups_per_minute,
        }
    }

    /// The accept loop's bounds.
    pub fn serve_options(&self) -> vtp_http::ServeOptions {
        vtp_http::ServeOptions {
            header_read_timeout: Duration::from_secs(self.header_timeout_secs),
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            ..vtp_http::ServeOptions::default()
        }
    }

    /// What the leader does and how often.
    pub fn duties(&self) -> crate::leader::Duties {
        crate::leader::Duties {
            sweep: crate::sweeper::SweepPolicy::new(self.stale_after(), self.heartbeat()),
            queue: crate::queue::Policy::default(),
            reconcile_every: Duration::from_secs(self.reconcile_secs.max(1)),
            retention: crate::retention::Policy {
                interval: Duration::from_secs(self.retention_interval_secs),
                keep_finished: (self.retention_days > 0)
                    .then(|| Duration::from_secs(u64::from(self.retention_days) * 86_400)),
                ..crate::retention::Policy::default()
            },
        }
    }

    /// The authentication mode in force: as configured, else by address.
    pub fn auth_mode(&self) -> AuthMode {
        self.auth
            .unwrap_or_else(|| AuthMode::default_for(self.listen))
    }

    /// Whether `python` jobs are taken: as configured, else only without
    /// tokens (one local user, who runs their own code anyway).
    pub fn user_code_allowed(&self) -> bool {
        self.allow_user_code
            .unwrap_or(self.auth_mode() == AuthMode::Off)
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
    /// under `./.vtp/trainer`.
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
                let mut launcher =
                    vtp_launch::HttpLauncher::new(&self.trainer_url)?.with_slots(self.max_running);
                if let Some(token) = &self.trainer_token {
                    launcher = launcher.with_token(token);
                }
                Ok(Arc::new(launcher))
            }
            LauncherKind::Subprocess => {
                let program = self
                    .trainer_bin
                    .clone()
                    .unwrap_or_else(vtp_launch::SubprocessLauncher::sibling_binary);
                let blob_url = if self.blob_url.starts_with("file://") {
                    blob_uri.to_owned()
                } else {
                    self.blob_url.clone()
                };
                // The child inherits `VTP_S3_*` from this process's
                // environment; settings given as flags reach it the same
                // way (in its environment, never on its command line).
                let mut launcher = vtp_launch::SubprocessLauncher::new(program, jobs)
                    .with_slots(self.max_running.unwrap_or(1));
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
                let mut config = self.k8s.config(trainer_env)?;
                if let Some(max) = self.max_running {
                    config.max_running = max;
                }
                // Its reconciler runs on the leading backend
                // (`TrainerLauncher::reconcile`), not on every replica.
                let launcher = vtp_launch::KubernetesLauncher::connect(config, jobs).await?;
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
