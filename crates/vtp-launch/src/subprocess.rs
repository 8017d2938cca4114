//! [`SubprocessLauncher`] (tier 1): the backend starts the trainer service as
//! a child process on loopback and talks to it over the same HTTP contract as
//! [`HttpLauncher`], so everything above the launcher is shared with the
//! other tiers.
//!
//! The child is started on the first launch (and again if it died). When it
//! exits, the attempt of every job it was running ends with its exit status
//! ([`vtp_core::JobStoreExt::end_attempt`]): relaunched while attempts are
//! left, failed otherwise. A child whose job's lease expired (frozen, hung)
//! is killed by [`TrainerLauncher::stop`]. The child runs with
//! `--exit-with-parent`, so it does not outlive the backend.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};
use vtp_core::{
    CancelOutcome, Error, JobId, JobStore, JobStoreExt, Result, StartTraining, TrainerLauncher,
};

use crate::http::HttpLauncher;

pub use vtp_core::launcher::LISTENING_PREFIX;

/// Jobs handed to a child, with the attempt each was launched as.
type Held = Arc<Mutex<HashMap<JobId, i32>>>;

#[derive(Debug)]
struct Child {
    http: HttpLauncher,
    jobs: Held,
    /// Cleared by the monitor when the child exits.
    alive: Arc<AtomicBool>,
    /// Tells the monitor to kill the child.
    kill: Arc<tokio::sync::Notify>,
}

/// Runs the trainer service as a child process of the backend.
#[derive(Debug)]
pub struct SubprocessLauncher {
    program: PathBuf,
    envs: Vec<(String, String)>,
    /// The shared token of this backend and its child (`VTP_TRAINER_TOKEN`).
    token: String,
    jobs: Arc<dyn JobStore>,
    child: tokio::sync::Mutex<Option<Child>>,
    /// Jobs the child trains at once (its `VTP_TRAINER_CONCURRENCY`).
    slots: u32,
}

impl SubprocessLauncher {
    /// How long the child may take to listen.
    pub const START_TIMEOUT: Duration = Duration::from_secs(60);

    /// A launcher running `program` (the `vtp-trainer-service` binary), failing
    /// jobs in `jobs` when it dies.
    pub fn new(program: impl Into<PathBuf>, jobs: Arc<dyn JobStore>) -> Self {
        SubprocessLauncher {
            program: program.into(),
            envs: Vec::new(),
            token: vtp_core::auth::random_token(),
            jobs,
            child: tokio::sync::Mutex::new(None),
            slots: 1,
        }
    }

    /// The child trains `slots` jobs at once (at least one); the backend's
    /// queue hands it no more.
    #[must_use]
    pub fn with_slots(mut self, slots: u32) -> Self {
        self.slots = slots.max(1);
        self
    }

    /// Variables the child inherits from the backend's environment, by
    /// prefix; everything else (the database URL with its password, the
    /// backend's own settings) stays out of the trainer.
    pub const INHERITED_ENV: [&'static str; 26] = [
        "PATH",
        // The Python that user scripts run with (`python` jobs), and the
        // switches that keep their libraries off the network.
        "VIRTUAL_ENV",
        "YOLO_OFFLINE",
        "HF_HUB_OFFLINE",
        "HOME",
        "TMPDIR",
        "LANG",
        "LC_",
        "TZ",
        "LD_LIBRARY_PATH",
        "VTP_S3_",
        "VTP_LOG",
        "VTP_TRAINER_",
        "VTP_HEARTBEAT_SECS",
        "VTP_UPLOAD_RETRY_SECS",
        // The trace exporter's collector and the SDK's batching and
        // exporter settings (not its service name: the child is another
        // service).
        "VTP_OTLP_ENDPOINT",
        "OTEL_BSP_",
        "OTEL_EXPORTER_OTLP_",
        "AWS_",
        "OMP_",
        "MKL_",
        "CUDA_",
        "RUST_",
        // A private CA to trust (S3, the backend) and the standard places
        // of a system CA bundle.
        "VTP_CA_CERT",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ];

    /// Sets an environment variable for the child (blob store settings, work dir).
    #[must_use]
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((name.into(), value.into()));
        self
    }

    /// The `vtp-trainer-service` next to the running executable, the usual
    /// place after `cargo build`.
    pub fn sibling_binary() -> PathBuf {
        let name = "vtp-trainer-service";
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// The child's HTTP launcher, its jobs and its liveness, starting the
    /// child when none is alive.
    async fn ensure_child(&self) -> Result<(HttpLauncher, Held, Arc<AtomicBool>)> {
        let mut guard = self.child.lock().await;
        if let Some(child) = guard.as_ref()
            && child.alive.load(Ordering::SeqCst)
        {
            return Ok((child.http.clone(), child.jobs.clone(), child.alive.clone()));
        }
        let child = self.spawn().await?;
        let out = (child.http.clone(), child.jobs.clone(), child.alive.clone());
        *guard = Some(child);
        Ok(out)
    }

    async fn spawn(&self) -> Result<Child> {
        if !self.program.is_file() {
            return Err(Error::unavailable(
                "trainer",
                format!(
                    "trainer binary {} not found; build it with `cargo build -p vtp-trainer --features service,torch --bin vtp-trainer-service` or set VTP_TRAINER_BIN",
                    self.program.display()
                ),
            ));
        }
        let mut command = tokio::process::Command::new(&self.program);
        let inherited = std::env::vars().filter(|(name, _)| {
            Self::INHERITED_ENV
                .iter()
                .any(|prefix| name == prefix || (prefix.ends_with('_') && name.starts_with(prefix)))
        });
        command
            .args(["--listen", "127.0.0.1:0", "--exit-with-parent"])
            .env_clear()
            .envs(inherited)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            // In the environment, not on the command line (which `ps` shows).
            .env("VTP_TRAINER_TOKEN", &self.token)
            .env("VTP_TRAINER_CONCURRENCY", self.slots.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut process = command.spawn().map_err(|e| {
            Error::unavailable(
                "trainer",
                format!("spawning {}: {e}", self.program.display()),
            )
        })?;
        let stdout = process
            .stdout
            .take()
            .ok_or_else(|| Error::internal("child stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Self::START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix(LISTENING_PREFIX) {
                    return Some(url.trim().to_owned());
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(url) = url else {
            let _ = process.kill().await;
            let status = process
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_default();
            return Err(Error::unavailable(
                "trainer",
                format!("{} did not start ({status})", self.program.display()),
            ));
        };
        let pid = process.id();
        tracing::info!(?pid, %url, "trainer process started");
        let jobs: Held = Arc::new(Mutex::new(HashMap::new()));
        let alive = Arc::new(AtomicBool::new(true));
        let kill = Arc::new(tokio::sync::Notify::new());
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (store, held, flag, killer) =
            (self.jobs.clone(), jobs.clone(), alive.clone(), kill.clone());
        tokio::spawn(async move {
            let status = tokio::select! {
                status = process.wait() => status,
                () = killer.notified() => {
                    tracing::warn!(?pid, "killing the trainer process");
                    let _ = process.start_kill();
                    process.wait().await
                }
            };
            flag.store(false, Ordering::SeqCst);
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            let lost: Vec<(JobId, i32)> = held.lock().expect("jobs lock").drain().collect();
            tracing::warn!(?pid, %status, jobs = lost.len(), "trainer process exited");
            // Each job's attempt ends (once: an attempt the sweeper already
            // ended is not counted again): the backend's relauncher starts
            // the next one (resuming from its last checkpoint set) while
            // attempts are left; otherwise the job fails with this reason.
            for (job_id, attempt) in lost {
                let reason = format!("the trainer process exited ({status})");
                if let Err(e) = store.end_attempt(job_id, attempt, &reason).await {
                    tracing::error!(%job_id, error = %e, "could not end the attempt of the dead trainer");
                }
            }
        });
        Ok(Child {
            http: HttpLauncher::new(&url)?.with_token(&self.token),
            jobs,
            alive,
            kill,
        })
    }

    async fn current(&self) -> Option<(HttpLauncher, Held)> {
        let guard = self.child.lock().await;
        let child = guard.as_ref()?;
        child
            .alive
            .load(Ordering::SeqCst)
            .then(|| (child.http.clone(), child.jobs.clone()))
    }
}

#[async_trait]
impl TrainerLauncher for SubprocessLauncher {
    fn name(&self) -> &'static str {
        "subprocess"
    }

    async fn capacity(&self) -> Result<vtp_core::Capacity> {
        Ok(vtp_core::Capacity::Slots(self.slots))
    }

    async fn launch(&self, request: &StartTraining) -> Result<()> {
        let (http, jobs, alive) = self.ensure_child().await?;
        http.launch(request).await?;
        // Recorded only once the child took it: a child dying during the
        // launch (SIGTERM, or killed for a lost lease a moment ago) must
        // not end an attempt it never held.
        jobs.lock()
            .expect("jobs lock")
            .insert(request.job_id, request.attempt);
        if !alive.load(Ordering::SeqCst) {
            // It died right after taking the job, perhaps after its monitor
            // ended the attempts it held: this one ends here (once; the
            // store ignores a second end of the same attempt).
            self.jobs
                .end_attempt(
                    request.job_id,
                    request.attempt,
                    "the trainer process exited as the job was launched",
                )
                .await?;
        }
        Ok(())
    }

    async fn cancel(&self, job_id: JobId) -> Result<CancelOutcome> {
        match self.current().await {
            Some((http, _)) => http.cancel(job_id).await,
            None => Ok(CancelOutcome::NotRunning),
        }
    }

    async fn is_running(&self, job_id: JobId) -> Result<bool> {
        match self.current().await {
            Some((http, _)) => http.is_running(job_id).await,
            None => Ok(false),
        }
    }

    /// Kills the child holding attempt `attempt` of `job_id`: a lease
    /// expires only when the whole process stopped reporting (its
    /// heartbeats run beside the training threads), so it is frozen or hung
    /// and would not act on a request. Its other jobs' attempts end too, and
    /// are relaunched. A child that already holds a later attempt of the job
    /// (relaunched into it) is only asked to drop the old one.
    async fn stop(&self, job_id: JobId, attempt: i32) -> Result<()> {
        let (http, held) = {
            let guard = self.child.lock().await;
            let Some(child) = guard.as_ref() else {
                return Ok(());
            };
            if !child.alive.load(Ordering::SeqCst) {
                return Ok(());
            }
            let held = child.jobs.lock().expect("jobs lock").get(&job_id).copied();
            match held {
                Some(held) if held <= attempt => {
                    // Dead from now on: the relaunch that follows starts a
                    // new child instead of handing the job to this one.
                    child.alive.store(false, Ordering::SeqCst);
                    child.kill.notify_one();
                    return Ok(());
                }
                None => return Ok(()),
                Some(held) => (child.http.clone(), held),
            }
        };
        tracing::debug!(%job_id, attempt, held, "the child runs a later attempt; asking it to drop the old one");
        http.stop(job_id, attempt).await
    }
}
