//! The user's own training code (`framework: "python"`,
//! [`vtp_core::ScriptConfig`]): the service runs the job's entrypoint with
//! the trainer's Python in the job's own directory, with an allow-listed
//! environment, and serves the `vtp.run()` SDK inside the script over a
//! Unix socket ([`protocol`]).
//!
//! The script never holds the job's callback secret or the store's
//! credentials: it asks this service, its parent, to report an epoch or
//! store a checkpoint set, and the service does so exactly as for a
//! built-in model (the persisted outbox, signed reports, heartbeats while
//! the script computes, verified checkpoint sets that a relaunched attempt
//! restores). So a script can neither forge another job's reports nor read
//! another tenant's objects through the SDK.
//!
//! [`RunClient`] is the SDK's side of the socket, which the `vtp` Python
//! package wraps (PyO3): one implementation for the service and its tests.
//!
//! The package engine (`framework: "ultralytics"`, `config.engine:
//! "package"`) is such a script too, shipped in the `vtp` package
//! ([`PACKAGE_ENGINE`]): the same socket, reports and sets.
//!
//! How an attempt ends: the script's exit status 0 completes the job (with
//! its best saved checkpoint); another status fails it with the tail of its
//! stderr; a signal it did not get from us (the OOM killer, a `kill -9`)
//! and silence past `report_timeout_secs` fail the attempt as retryable, so
//! the backend relaunches it and `run.restored()` hands the next attempt
//! the last stored set. A cancel sends SIGTERM to the script's process
//! group (`run.should_stop()` turns true), then SIGKILL after a grace.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use vtp_core::{EpochReport, Error, Result, StepProgress};

/// How the service runs scripts.
#[derive(Debug, Clone)]
pub struct ScriptOptions {
    /// The interpreter (`VTP_TRAINER_PYTHON`; by default the project venv's,
    /// [`default_python`]).
    pub python: PathBuf,
    /// More variables a script inherits from the service, by exact name or,
    /// ending in `_`, by prefix, beside [`SCRIPT_ENV`].
    pub extra_env: Vec<String>,
    /// Silence after which a script is stopped as hung, when its config
    /// names no `report_timeout_secs`.
    pub report_timeout: Duration,
    /// How long a script has to stop after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// This trainer's machine when it is one of several running one job
    /// (a pod of a Kubernetes Indexed Job); `None` on a trainer of its own.
    pub node: Option<Node>,
}

/// One machine of a run across several: a pod of a Kubernetes Indexed
/// Job, whose completion index is its rank. Node 0 hosts the rendezvous
/// and is the one that reports; the others train their ranks and stay
/// silent towards the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `torchrun --node-rank`.
    pub rank: u32,
    /// Where node 0 is reached (`torchrun --master-addr`).
    pub master_addr: String,
    /// Its rendezvous port (`torchrun --master-port`).
    pub master_port: u16,
}

impl Node {
    /// Whether this node reports for the job (node 0, where rank 0 runs).
    pub fn reports(&self) -> bool {
        self.rank == 0
    }
}

impl Default for ScriptOptions {
    fn default() -> Self {
        ScriptOptions {
            python: default_python(),
            extra_env: Vec::new(),
            report_timeout: Duration::from_secs(3600),
            stop_grace: Duration::from_secs(30),
            node: None,
        }
    }
}

/// The interpreter scripts run with when none is configured: the active
/// virtual environment's (`$VIRTUAL_ENV/bin/python`, where the project's
/// set-up installs torch and `vtp`), else `python3` on the `PATH`.
pub fn default_python() -> PathBuf {
    std::env::var_os("VIRTUAL_ENV")
        .map(|venv| PathBuf::from(venv).join("bin").join("python"))
        .filter(|python| python.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// What a script inherits from the service's environment: exact names, or
/// prefixes where they end in `_`. Nothing else: not the store's
/// credentials (`VTP_S3_*`, `AWS_*`), not the service's token, not any
/// database URL.
pub const SCRIPT_ENV: [&str; 17] = [
    "PATH",
    "LANG",
    "LC_",
    "TZ",
    "LD_LIBRARY_PATH",
    "VIRTUAL_ENV",
    "OMP_",
    "MKL_",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "PYTHONHASHSEED",
    "YOLO_OFFLINE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TORCH_HOME",
];

/// The module the package engine runs (`config.engine: "package"`): an
/// SDK script of the `vtp` Python package that drives the `ultralytics`
/// package.
pub const PACKAGE_ENGINE: &str = "vtp.ultralytics_engine";

/// The variable naming the SDK's socket.
pub const SOCKET_ENV: &str = "VTP_RUN_SOCKET";
/// The variable holding the token the SDK opens the socket with.
pub const TOKEN_ENV: &str = "VTP_RUN_TOKEN";

/// Most files in one saved checkpoint.
pub const MAX_CHECKPOINT_FILES: usize = 64;
/// Longest request line on the socket.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Most metrics in one report.
pub const MAX_METRICS: usize = 256;
/// Most connections a script holds at once: a few per rank of the largest
/// distributed run.
const MAX_CONNECTIONS: usize = 4 * vtp_core::Distributed::MAX_NPROC_PER_NODE as usize;
/// Lines of stderr kept for the failure message.
const STDERR_TAIL_LINES: usize = 20;
/// Longest line kept of the script's output.
const MAX_LINE: usize = 4096;

/// The wire format of the SDK's socket: one JSON object per line each way,
/// one answer per request, in order.
pub mod protocol {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use serde::{Deserialize, Serialize};

    /// What the SDK asks.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
    pub enum Request {
        /// The first request on a connection: the token from
        /// [`super::TOKEN_ENV`]; answered with the [`Context`].
        Hello {
            /// The run's token.
            token: String,
            /// The process's rank in a distributed run (torch's `RANK`; 0
            /// in a plain one). Only rank 0's reports, steps and
            /// checkpoints are kept; the others' count as signs of life.
            #[serde(default)]
            rank: u32,
        },
        /// An epoch's metrics.
        Report {
            /// 1-based epoch.
            epoch: u32,
            /// Named values (`loss`, `val_loss`, `accuracy`, ...).
            metrics: BTreeMap<String, f64>,
        },
        /// Progress inside an epoch.
        Step {
            /// 1-based epoch.
            epoch: u32,
            /// Steps done.
            step: usize,
            /// Steps in the epoch.
            steps: usize,
            /// Running loss.
            loss: f64,
        },
        /// Store `path` (a file, or a flat directory of files) as the
        /// checkpoint of `epoch`; with `best`, also as the best so far.
        Checkpoint {
            /// Absolute path inside the job's directory.
            path: PathBuf,
            /// 1-based epoch.
            epoch: u32,
            /// The best checkpoint so far.
            best: bool,
        },
        /// Whether the run should stop.
        Poll,
    }

    /// The service's answer.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Reply {
        /// Whether the request was done.
        pub ok: bool,
        /// Why not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub error: Option<String>,
        /// The job was cancelled or its trainer is stopping: save and leave.
        #[serde(default)]
        pub stop: bool,
        /// For `hello`: the run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub context: Option<Context>,
        /// For `checkpoint`: the stored set's URI (none for the final epoch,
        /// whose files are uploaded when the script ends).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub stored: Option<String>,
    }

    /// What the script learns about its run.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Context {
        /// The job.
        pub job_id: String,
        /// Which attempt this is (1 for the first launch).
        pub attempt: i32,
        /// This process's rank (0 in a plain run): as its `hello` said.
        #[serde(default)]
        pub rank: u32,
        /// Epochs to train.
        pub epochs: u32,
        /// The job's whole config.
        pub config: serde_json::Value,
        /// The dataset, downloaded and unpacked.
        pub dataset_dir: PathBuf,
        /// The checkpoint restored for this attempt, if any.
        pub restored: Option<Restored>,
    }

    /// A restored checkpoint.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Restored {
        /// A directory holding the files as they were saved.
        pub dir: PathBuf,
        /// The epoch they were saved after.
        pub epoch: u32,
    }
}

use protocol::{Context, Reply, Request};

/// The SDK's side of the socket: one connection, blocking calls.
#[derive(Debug)]
pub struct RunClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    context: Context,
}

impl RunClient {
    /// Connects to the service named by [`SOCKET_ENV`] and [`TOKEN_ENV`];
    /// `None` outside a job (neither set).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the socket cannot be reached or the
    /// service refuses the token.
    pub fn from_env() -> Result<Option<Self>> {
        let (Some(socket), Some(token)) =
            (std::env::var_os(SOCKET_ENV), std::env::var(TOKEN_ENV).ok())
        else {
            return Ok(None);
        };
        // torchrun's `RANK`; a plain run has none.
        let rank = match std::env::var("RANK") {
            Ok(rank) => rank
                .parse()
                .map_err(|_| Error::invalid("RANK", format!("{rank:?} is not a process rank")))?,
            Err(_) => 0,
        };
        Self::connect(Path::new(&socket), &token, rank).map(Some)
    }

    /// Connects to `socket` with `token`, as the process of `rank`.
    ///
    /// # Errors
    /// As [`RunClient::from_env`].
    pub fn connect(socket: &Path, token: &str, rank: u32) -> Result<Self> {
        let unavailable = |e: std::io::Error| {
            Error::unavailable(
                "trainer",
                format!("the job's trainer at {}: {e}", socket.display()),
            )
        };
        let stream = UnixStream::connect(socket).map_err(unavailable)?;
        let writer = stream.try_clone().map_err(unavailable)?;
        let mut client = RunClient {
            reader: BufReader::new(stream),
            writer,
            context: Context {
                job_id: String::new(),
                attempt: 0,
                rank: 0,
                epochs: 0,
                config: serde_json::Value::Null,
                dataset_dir: PathBuf::new(),
                restored: None,
            },
        };
        let reply = client.call(&Request::Hello {
            token: token.to_owned(),
            rank,
        })?;
        client.context = reply
            .context
            .ok_or_else(|| Error::internal("the trainer sent no context"))?;
        Ok(client)
    }

    /// The run.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Sends `request` and waits for its answer.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a request the service refused (a bad
    /// epoch, a path outside the job);
    /// [`Error::Unavailable`] when the service is gone.
    pub fn call(&mut self, request: &Request) -> Result<Reply> {
        let gone = |e: std::io::Error| {
            Error::unavailable("trainer", format!("the job's trainer went away: {e}"))
        };
        let mut line = serde_json::to_vec(request).map_err(|e| Error::internal(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(gone)?;
        let mut answer = Vec::new();
        match read_line_bounded(&mut self.reader, MAX_REQUEST_BYTES, &mut answer).map_err(gone)? {
            Some(_) => {}
            None => {
                return Err(gone(std::io::Error::from(
                    std::io::ErrorKind::UnexpectedEof,
                )));
            }
        }
        let reply: Reply = serde_json::from_slice(&answer)
            .map_err(|e| Error::internal(format!("a malformed answer from the trainer: {e}")))?;
        if !reply.ok {
            let op = serde_json::to_value(request)
                .ok()
                .and_then(|v| v.get("op").and_then(|op| op.as_str().map(str::to_owned)))
                .unwrap_or_default();
            return Err(Error::invalid(
                op,
                reply.error.unwrap_or_else(|| "refused".into()),
            ));
        }
        Ok(reply)
    }
}

/// Reads one `\n`-terminated line into `out` (without the newline), keeping
/// at most `max` bytes of it and dropping the rest. `None` at the end of
/// the stream; `Some(true)` when the line was cut.
fn read_line_bounded(
    reader: &mut impl BufRead,
    max: usize,
    out: &mut Vec<u8>,
) -> std::io::Result<Option<bool>> {
    out.clear();
    let mut cut = false;
    let mut any = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(any.then_some(cut));
        }
        any = true;
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(end) => (&buf[..end], Some(end + 1)),
            None => (buf, None),
        };
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        cut |= chunk.len() > room;
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(Some(cut));
        }
    }
}

/// What the service does with the script's requests: the same reports and
/// checkpoint sets as for a built-in model.
pub(crate) trait ScriptHost {
    /// An epoch's metrics, reported.
    fn epoch(&mut self, report: &EpochReport);
    /// Progress inside an epoch, for the heartbeats.
    fn step(&mut self, step: &StepProgress);
    /// The output directory now holds the checkpoint of `epoch` (not the
    /// final one): store its set; the set's URI.
    fn checkpoint_saved(&mut self, epoch: u32) -> Option<String>;
}

/// What a run starts.
#[derive(Debug, Clone)]
pub(crate) enum Program {
    /// The user's entrypoint, a file of their unpacked code archive, run in
    /// the archive's directory.
    File {
        code_dir: PathBuf,
        entrypoint: String,
    },
    /// A module of the trainer's Python (`python -m`), run in the job's
    /// directory: the package engine, `vtp.ultralytics_engine`.
    Module(&'static str),
}

impl std::fmt::Display for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Program::File { entrypoint, .. } => f.write_str(entrypoint),
            Program::Module(module) => write!(f, "python -m {module}"),
        }
    }
}

/// What a run starts, and how the platform treats it: a `python` job's
/// entrypoint ([`Script::user`]) or the package engine
/// ([`Script::package`]).
#[derive(Debug, Clone)]
pub(crate) struct Script {
    pub program: Program,
    /// Its command-line arguments.
    pub args: Vec<String>,
    /// Epochs it trains.
    pub epochs: u32,
    /// Its own silence limit, if the job set one.
    pub report_timeout_secs: Option<u64>,
    /// Its processes under `torchrun`, if more than one.
    pub distributed: Option<vtp_core::Distributed>,
}

impl Script {
    /// A `python` job's entrypoint, in its code archive unpacked at
    /// `code_dir`.
    pub(crate) fn user(config: &vtp_core::ScriptConfig, code_dir: PathBuf) -> Self {
        Script {
            program: Program::File {
                code_dir,
                entrypoint: config.entrypoint.clone(),
            },
            args: config.args.clone(),
            epochs: config.epochs,
            report_timeout_secs: config.report_timeout_secs,
            distributed: config.distributed,
        }
    }

    /// The package engine ([`PACKAGE_ENGINE`]), one process.
    pub(crate) fn package(config: &vtp_core::PackageConfig) -> Self {
        Script {
            program: Program::Module(PACKAGE_ENGINE),
            args: Vec::new(),
            epochs: config.epochs,
            report_timeout_secs: config.report_timeout_secs,
            distributed: None,
        }
    }
}

/// One run of a script.
#[derive(Debug)]
pub(crate) struct ScriptRun {
    pub options: ScriptOptions,
    pub script: Script,
    /// The job's config, whole (the script's `run.config`).
    pub raw_config: serde_json::Value,
    pub job_id: vtp_core::JobId,
    pub attempt: i32,
    /// The attempt's directory: the script may save checkpoints from
    /// anywhere inside it but `output`.
    pub job_dir: PathBuf,
    pub dataset_dir: PathBuf,
    /// Where checkpoint files go (`last.*`, `best.*`) for the sets and the
    /// final upload.
    pub output: PathBuf,
    /// The epoch of the set restored into `output`, if any.
    pub restored_epoch: Option<u32>,
}

/// How a script ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ScriptEnd {
    /// Exit status 0, not cancelled.
    Completed,
    /// It stopped (or was stopped) after a cancel.
    Cancelled,
}

/// A message from a connection thread to the run's loop.
struct Incoming {
    request: Request,
    /// The rank its connection said hello as.
    rank: u32,
    answer: mpsc::Sender<Reply>,
}

impl ScriptRun {
    /// Runs the script to its end, serving its requests with `host`.
    /// Blocking: call it on a blocking thread.
    pub(crate) fn run(
        &self,
        host: &mut dyn ScriptHost,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<ScriptEnd> {
        if let Program::File {
            code_dir,
            entrypoint,
        } = &self.script.program
            && !code_dir.join(entrypoint).is_file()
        {
            return Err(Error::invalid(
                "config.entrypoint",
                format!("{entrypoint} is not a file of the code archive"),
            ));
        }
        let restored = self.restored_dir()?;
        let io = |what: &str, e: std::io::Error| Error::internal(format!("{what}: {e}"));
        // The socket lives in a private directory of its own: its path must
        // stay short (a Unix socket's is at most 107 bytes), and no other
        // user can reach it.
        let socket_dir = tempfile::Builder::new()
            .prefix("vtp-run-")
            .tempdir()
            .map_err(|e| io("the run's socket directory", e))?;
        std::fs::set_permissions(
            socket_dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| io("the run's socket directory", e))?;
        let socket = socket_dir.path().join("run.sock");
        let listener = UnixListener::bind(&socket).map_err(|e| io("the run's socket", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io("the run's socket", e))?;
        let token = vtp_core::auth::random_token();
        for dir in ["home", "tmp"] {
            std::fs::create_dir_all(self.job_dir.join(dir))
                .map_err(|e| io("the script's directories", e))?;
        }

        let mut command = Command::new(&self.options.python);
        if let Some(distributed) = self.script.distributed {
            // PyTorch's own launcher, through `vtp.torchrun`, which passes
            // a rank's death by signal on as its own (see there). Every
            // rank inherits the socket and token; only rank 0's reports and
            // checkpoints are kept (`handle`).
            command.args(["-m", "vtp.torchrun"]);
            command.args(torchrun_args(&distributed, self.options.node.as_ref())?);
        }
        let cwd = match &self.script.program {
            Program::File {
                code_dir,
                entrypoint,
            } => {
                command.arg(code_dir.join(entrypoint));
                code_dir
            }
            Program::Module(module) => {
                // torchrun's own flag for a module, else Python's.
                command.arg(if self.script.distributed.is_some() {
                    "--module"
                } else {
                    "-m"
                });
                command.arg(module);
                &self.job_dir
            }
        };
        command
            .args(&self.script.args)
            .current_dir(cwd)
            .env_clear()
            .envs(script_env(&self.options.extra_env))
            .env("HOME", self.job_dir.join("home"))
            .env("TMPDIR", self.job_dir.join("tmp"))
            .env("PYTHONUNBUFFERED", "1")
            .env(SOCKET_ENV, &socket)
            .env(TOKEN_ENV, &token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group: a stop reaches every process it started
        // (torchrun's ranks, data loader workers).
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().map_err(|e| {
            Error::backend(
                "trainer",
                format!("cannot start {}: {e}", self.options.python.display()),
            )
        })?;
        tracing::info!(pid = child.id(), program = %self.script.program, "the script started");
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let span = tracing::Span::current();
        let readers = [
            child.stdout.take().map(|out| {
                let span = span.clone();
                std::thread::spawn(move || forward_lines(out, "stdout", &span, None))
            }),
            child.stderr.take().map(|err| {
                let (span, tail) = (span.clone(), tail.clone());
                std::thread::spawn(move || forward_lines(err, "stderr", &span, Some(&tail)))
            }),
        ];

        let (sender, incoming) = mpsc::channel::<Incoming>();
        let stop_accepting = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = stop_accepting.clone();
            let token = token.clone();
            std::thread::spawn(move || accept(&listener, &token, &sender, &stop))
        };
        let ended = self.serve(&mut child, host, cancelled, &incoming, restored);
        stop_accepting.store(true, Ordering::SeqCst);
        let _ = acceptor.join();
        // Every process of its group, whatever is left of it.
        signal_group(&child, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        for reader in readers.into_iter().flatten() {
            let _ = reader.join();
        }
        let stderr_tail = tail
            .lock()
            .map(|lines| Vec::from(lines.clone()).join("\n"))
            .unwrap_or_default();
        match ended? {
            // Asked to stop, it left (saving first, if it listened): a
            // cancel, even when it exits 0.
            Ended::Exited(_) | Ended::Stopped if cancelled() => Ok(ScriptEnd::Cancelled),
            Ended::Exited(status) if status.success() => Ok(ScriptEnd::Completed),
            Ended::Stopped => Ok(ScriptEnd::Cancelled),
            // Across machines, a rank that fails here may have been failed
            // by a machine that went away; as torchrun's own restarts do,
            // the attempt is retried (up to the job's `max_attempts`).
            Ended::Exited(status) if self.script.distributed.is_some_and(|d| d.nnodes > 1) => {
                Err(Error::unavailable(
                    "training script",
                    format!(
                        "{}; a run across machines is retried from its last stored set",
                        vtp_core::error_chain(&exit_error(status, &stderr_tail))
                    ),
                ))
            }
            Ended::Exited(status) => Err(exit_error(status, &stderr_tail)),
            Ended::Silent(after) => Err(Error::unavailable(
                "training script",
                format!(
                    "it sent no report, step or checkpoint for {}s and was stopped as hung{}",
                    after.as_secs(),
                    tail_note(&stderr_tail)
                ),
            )),
        }
    }

    /// Serves requests until the script exits, falls silent, or stops
    /// after a cancel.
    fn serve(
        &self,
        child: &mut Child,
        host: &mut dyn ScriptHost,
        cancelled: &(dyn Fn() -> bool + Sync),
        incoming: &mpsc::Receiver<Incoming>,
        restored: Option<protocol::Restored>,
    ) -> Result<Ended> {
        let timeout = self
            .script
            .report_timeout_secs
            .map_or(self.options.report_timeout, Duration::from_secs);
        let mut heard = Instant::now();
        let mut stopping: Option<Instant> = None;
        let context = Context {
            job_id: self.job_id.to_string(),
            attempt: self.attempt,
            // Each connection's own, from its hello.
            rank: 0,
            epochs: self.script.epochs,
            config: self.raw_config.clone(),
            dataset_dir: self.dataset_dir.clone(),
            restored,
        };
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| Error::internal(format!("waiting for the script: {e}")))?
            {
                // Answer what it sent last, if anything, then leave.
                return Ok(if stopping.is_some() && !status.success() {
                    Ended::Stopped
                } else {
                    Ended::Exited(status)
                });
            }
            if stopping.is_none() && cancelled() {
                tracing::info!("asking the script to stop (SIGTERM)");
                if self.script.distributed.is_some() {
                    // torchrun relays it to every rank once; a second one
                    // from us would end the ranks before they save.
                    signal_child(child, nix::sys::signal::Signal::SIGTERM);
                } else {
                    signal_group(child, nix::sys::signal::Signal::SIGTERM);
                }
                stopping = Some(Instant::now());
            }
            if let Some(since) = stopping
                && since.elapsed() > self.options.stop_grace
            {
                tracing::warn!(
                    grace_secs = self.options.stop_grace.as_secs(),
                    "the script did not stop after SIGTERM; killing it"
                );
                return Ok(Ended::Stopped);
            }
            if stopping.is_none() && heard.elapsed() > timeout {
                return Ok(Ended::Silent(timeout));
            }
            let Ok(Incoming {
                request,
                rank,
                answer,
            }) = incoming.recv_timeout(Duration::from_millis(100))
            else {
                continue;
            };
            let stop = stopping.is_some() || cancelled();
            let reply = match self.handle(request, rank, host, &context) {
                Ok((counts, mut reply)) => {
                    if counts {
                        heard = Instant::now();
                    }
                    reply.stop = stop;
                    reply
                }
                Err(e) => Reply {
                    ok: false,
                    error: Some(vtp_core::error_chain(&e)),
                    stop,
                    context: None,
                    stored: None,
                },
            };
            let _ = answer.send(reply);
        }
    }

    /// One request from the process of `rank`; whether it counts as a
    /// sign of life, and the answer.
    fn handle(
        &self,
        request: Request,
        rank: u32,
        host: &mut dyn ScriptHost,
        context: &Context,
    ) -> Result<(bool, Reply)> {
        let ok = Reply {
            ok: true,
            error: None,
            stop: false,
            context: None,
            stored: None,
        };
        let epochs = self.script.epochs;
        let check_epoch = |epoch: u32| {
            if (1..=epochs).contains(&epoch) {
                Ok(())
            } else {
                Err(Error::invalid(
                    "epoch",
                    format!("{epoch} is outside 1..={epochs}"),
                ))
            }
        };
        match request {
            Request::Hello { rank, .. } => Ok((
                true,
                Reply {
                    context: Some(Context {
                        rank,
                        ..context.clone()
                    }),
                    ..ok
                },
            )),
            Request::Poll => Ok((false, ok)),
            // The other ranks of a distributed run compute the same epochs
            // as rank 0: what they send shows they live, and only rank 0's
            // is kept (as torch's own examples log and save on rank 0).
            Request::Report { epoch, .. }
            | Request::Step { epoch, .. }
            | Request::Checkpoint { epoch, .. }
                if rank != 0 =>
            {
                check_epoch(epoch)?;
                Ok((true, ok))
            }
            Request::Report { epoch, metrics } => {
                check_epoch(epoch)?;
                if metrics.len() > MAX_METRICS {
                    return Err(Error::invalid(
                        "metrics",
                        format!("{} metrics; at most {MAX_METRICS}", metrics.len()),
                    ));
                }
                for name in metrics.keys() {
                    vtp_core::validate_name("metrics", name)?;
                }
                // The backend files a report's metrics under its `epoch`.
                let mut metrics = metrics;
                metrics.insert("epoch".into(), f64::from(epoch));
                host.epoch(&EpochReport {
                    epoch,
                    epochs,
                    metrics,
                });
                Ok((true, ok))
            }
            Request::Step {
                epoch,
                step,
                steps,
                loss,
            } => {
                check_epoch(epoch)?;
                host.step(&StepProgress {
                    epoch,
                    epochs,
                    step,
                    steps,
                    loss,
                });
                Ok((true, ok))
            }
            Request::Checkpoint { path, epoch, best } => {
                check_epoch(epoch)?;
                self.take_checkpoint(&path, best)?;
                // The final epoch's files are uploaded once the script ends.
                let stored = (epoch < epochs)
                    .then(|| host.checkpoint_saved(epoch))
                    .flatten();
                Ok((true, Reply { stored, ..ok }))
            }
        }
    }

    /// Copies the files at `path` into the output directory as `last.*`
    /// (and `best.*`), replacing the ones saved before.
    fn take_checkpoint(&self, path: &Path, best: bool) -> Result<()> {
        let invalid = |message: String| Error::invalid("path", message);
        let io = |e: std::io::Error| invalid(format!("{}: {e}", path.display()));
        let real = path.canonicalize().map_err(io)?;
        let job_dir = self.job_dir.canonicalize().map_err(io)?;
        let output = self.output.canonicalize().map_err(io)?;
        if !real.starts_with(&job_dir) || real.starts_with(&output) {
            return Err(invalid(format!(
                "{} is not inside the job's directory {}",
                path.display(),
                job_dir.display()
            )));
        }
        let meta = std::fs::metadata(&real).map_err(io)?;
        let mut files = Vec::new();
        if meta.is_file() {
            let name = real
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push((name, real.clone()));
        } else {
            for entry in std::fs::read_dir(&real).map_err(io)? {
                let entry = entry.map_err(io)?;
                let kind = entry.file_type().map_err(io)?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !kind.is_file() {
                    return Err(invalid(format!(
                        "{name} in {} is not a plain file; a checkpoint directory holds files only",
                        path.display()
                    )));
                }
                files.push((name, entry.path()));
            }
        }
        if files.is_empty() || files.len() > MAX_CHECKPOINT_FILES {
            return Err(invalid(format!(
                "{} holds {} files; a checkpoint is 1 to {MAX_CHECKPOINT_FILES}",
                path.display(),
                files.len()
            )));
        }
        for (name, _) in &files {
            vtp_core::validate_name("path", name)?;
        }
        let mut roles = vec!["last"];
        if best {
            roles.push("best");
        }
        for role in roles {
            remove_role(&self.output, role).map_err(io)?;
            for (name, source) in &files {
                let target = self.output.join(format!("{role}.{name}"));
                std::fs::copy(source, &target).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Turns the `last.*` files restored into the output directory back
    /// into the names the script saved them under, in `restored/`.
    fn restored_dir(&self) -> Result<Option<protocol::Restored>> {
        let Some(epoch) = self.restored_epoch else {
            return Ok(None);
        };
        let dir = self.job_dir.join("restored");
        let io = |e: std::io::Error| Error::internal(format!("{}: {e}", dir.display()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io)?;
        for entry in std::fs::read_dir(&self.output).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(original) = name.strip_prefix("last.") {
                std::fs::copy(entry.path(), dir.join(original)).map_err(io)?;
            }
        }
        Ok(Some(protocol::Restored { dir, epoch }))
    }
}

/// How serving ended.
enum Ended {
    Exited(ExitStatus),
    /// Stopped after a cancel (killed after the grace, or exited by signal).
    Stopped,
    Silent(Duration),
}

/// Removes `{role}.*` from `output`.
fn remove_role(output: &Path, role: &str) -> std::io::Result<()> {
    let prefix = format!("{role}.");
    for entry in std::fs::read_dir(output)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Whether a script may see the service's variable `name`: one of
/// [`SCRIPT_ENV`] or `extra`, by exact name or, for a rule ending in `_`,
/// by prefix.
fn allowed(name: &str, extra: &[String]) -> bool {
    SCRIPT_ENV
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .any(|rule| {
            if rule.ends_with('_') {
                name.starts_with(rule)
            } else {
                name == rule
            }
        })
}

/// The service's variables a script may see.
fn script_env(extra: &[String]) -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(name, _)| allowed(name, extra))
        .collect()
}

/// Sends `signal` to the script's own process (not its group).
fn signal_child(child: &Child, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Sends `signal` to the script's process group.
fn signal_group(child: &Child, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// The failure of a script that exited on its own with `status`.
/// `torchrun`'s arguments for `distributed` (its module and arguments
/// follow): on one machine its own standalone rendezvous; across machines
/// node `node`'s rank and node 0's address (the static rendezvous).
///
/// # Errors
/// [`Error::InvalidInput`] for a run across machines on a trainer that is
/// not one of them.
fn torchrun_args(distributed: &vtp_core::Distributed, node: Option<&Node>) -> Result<Vec<String>> {
    let mut args = Vec::new();
    if distributed.nnodes > 1 {
        let Some(node) = node.filter(|node| node.rank < distributed.nnodes) else {
            return Err(Error::invalid(
                "config.distributed.nnodes",
                format!(
                    "a run across {} machines needs a trainer on each (the Kubernetes launcher's Indexed Job); this trainer is {}",
                    distributed.nnodes,
                    node.map_or("on its own".to_owned(), |node| format!(
                        "node {}",
                        node.rank
                    ))
                ),
            ));
        };
        args.extend([
            format!("--nnodes={}", distributed.nnodes),
            format!("--node-rank={}", node.rank),
            format!("--master-addr={}", node.master_addr),
            format!("--master-port={}", node.master_port),
        ]);
    } else {
        args.extend(["--standalone".to_owned(), "--nnodes=1".to_owned()]);
    }
    args.push(format!("--nproc-per-node={}", distributed.nproc_per_node));
    Ok(args)
}

fn exit_error(status: ExitStatus, tail: &str) -> Error {
    match (status.code(), status.signal()) {
        (Some(code), _) => Error::backend(
            "training script",
            format!("it exited with status {code}{}", tail_note(tail)),
        ),
        // Killed from outside (the OOM killer, `kill -9`): another attempt
        // resumes from the last stored set.
        (None, Some(signal)) => Error::unavailable(
            "training script",
            format!(
                "it was killed by signal {signal} ({}){}",
                nix::sys::signal::Signal::try_from(signal).map_or("unknown", |s| s.as_str()),
                tail_note(tail)
            ),
        ),
        (None, None) => Error::internal(format!("the script ended with {status}")),
    }
}

fn tail_note(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; its stderr ends:\n{tail}")
    }
}

/// Logs each line of the script's `stream` in its job's span; keeps the
/// last lines in `tail`.
fn forward_lines(
    stream: impl Read,
    name: &'static str,
    span: &tracing::Span,
    tail: Option<&Mutex<VecDeque<String>>>,
) {
    let _in_job = span.enter();
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    while let Ok(Some(_)) = read_line_bounded(&mut reader, MAX_LINE, &mut line) {
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        tracing::info!(target: "vtp_script", stream = name, "{text}");
        if let Some(tail) = tail
            && let Ok(mut lines) = tail.lock()
        {
            if lines.len() == STDERR_TAIL_LINES {
                lines.pop_front();
            }
            lines.push_back(text);
        }
    }
}

/// Accepts the script's connections until `stop`, each served on a thread
/// of its own that hands requests to the run's loop.
fn accept(
    listener: &UnixListener,
    token: &str,
    sender: &mpsc::Sender<Incoming>,
    stop: &AtomicBool,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    tracing::warn!("the script opened too many SDK connections; one refused");
                    continue;
                }
                let _ = stream.set_nonblocking(false);
                open.fetch_add(1, Ordering::SeqCst);
                let (sender, token, open) = (sender.clone(), token.to_owned(), open.clone());
                std::thread::spawn(move || {
                    connection(stream, &token, &sender);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting an SDK connection");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Serves one connection: a `hello` with the run's token first, then any
/// request, each answered in turn.
fn connection(stream: UnixStream, token: &str, sender: &mpsc::Sender<Incoming>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let mut greeted = None;
    let refuse = |writer: &mut UnixStream, error: String| {
        let reply = Reply {
            ok: false,
            error: Some(error),
            stop: false,
            context: None,
            stored: None,
        };
        let _ = write_reply(writer, &reply);
    };
    while let Ok(Some(cut)) = read_line_bounded(&mut reader, MAX_REQUEST_BYTES, &mut line) {
        if cut {
            refuse(
                &mut writer,
                format!("a request longer than {MAX_REQUEST_BYTES} bytes"),
            );
            return;
        }
        let request: Request = match serde_json::from_slice(&line) {
            Ok(request) => request,
            Err(e) => {
                refuse(&mut writer, format!("a malformed request: {e}"));
                continue;
            }
        };
        let rank = match (&request, greeted) {
            (Request::Hello { token: given, rank }, _) => {
                if !vtp_core::auth::tokens_match(given, token) {
                    refuse(&mut writer, "wrong run token".into());
                    return;
                }
                greeted = Some(*rank);
                *rank
            }
            (_, None) => {
                refuse(&mut writer, "say hello with the run's token first".into());
                return;
            }
            (_, Some(rank)) => rank,
        };
        let (answer, reply) = mpsc::channel();
        if sender
            .send(Incoming {
                request,
                rank,
                answer,
            })
            .is_err()
        {
            return;
        }
        let Ok(reply) = reply.recv() else {
            return;
        };
        if write_reply(&mut writer, &reply).is_err() {
            return;
        }
    }
}

fn write_reply(writer: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn metrics(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn torchrun_runs_standalone_on_one_machine_and_from_node_0_across_several() {
        let one = vtp_core::Distributed {
            nproc_per_node: 4,
            nnodes: 1,
        };
        assert_eq!(
            torchrun_args(&one, None).unwrap(),
            ["--standalone", "--nnodes=1", "--nproc-per-node=4"]
        );
        let across = vtp_core::Distributed {
            nproc_per_node: 2,
            nnodes: 3,
        };
        let node = Node {
            rank: 2,
            master_addr: "vtp-x-0.vtp-x-1".into(),
            master_port: 29500,
        };
        assert!(!node.reports());
        assert_eq!(
            torchrun_args(&across, Some(&node)).unwrap(),
            [
                "--nnodes=3",
                "--node-rank=2",
                "--master-addr=vtp-x-0.vtp-x-1",
                "--master-port=29500",
                "--nproc-per-node=2"
            ]
        );
        // Not one of the machines (a trainer of its own, or a rank beyond
        // the run's): refused, not run on one machine.
        for node in [
            None,
            Some(Node {
                rank: 3,
                ..node.clone()
            }),
        ] {
            match torchrun_args(&across, node.as_ref()) {
                Err(Error::InvalidInput { field, .. }) => {
                    assert_eq!(field, "config.distributed.nnodes");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn lines_are_bounded_and_cut_lines_are_flagged() {
        let mut reader = BufReader::with_capacity(4, &b"short\nmuch longer line\nend"[..]);
        let mut line = Vec::new();
        assert_eq!(
            read_line_bounded(&mut reader, 8, &mut line).unwrap(),
            Some(false)
        );
        assert_eq!(line, b"short");
        assert_eq!(
            read_line_bounded(&mut reader, 8, &mut line).unwrap(),
            Some(true)
        );
        assert_eq!(line, b"much lon");
        assert_eq!(
            read_line_bounded(&mut reader, 8, &mut line).unwrap(),
            Some(false)
        );
        assert_eq!(line, b"end");
        assert_eq!(read_line_bounded(&mut reader, 8, &mut line).unwrap(), None);
    }

    #[test]
    fn the_script_sees_only_allow_listed_variables() {
        let extra = ["CUSTOM_".to_owned(), "EXACT".to_owned()];
        for secret in [
            "VTP_DATABASE_URL",
            "DATABASE_URL",
            "VTP_S3_SECRET_ACCESS_KEY",
            "AWS_SECRET_ACCESS_KEY",
            "VTP_TRAINER_TOKEN",
            "VTP_CALLBACK_SECRET",
            "HF_TOKEN",
            "PATHOLOGICAL",
            "EXACTLY",
        ] {
            assert!(!allowed(secret, &extra), "{secret} would reach the script");
        }
        for fine in [
            "PATH",
            "LC_ALL",
            "OMP_NUM_THREADS",
            "CUSTOM_SEED",
            "EXACT",
            "YOLO_OFFLINE",
        ] {
            assert!(allowed(fine, &extra), "{fine}");
        }
        assert!(script_env(&[]).iter().all(|(name, _)| allowed(name, &[])));
    }

    /// What a run asked of its host.
    #[derive(Default)]
    struct Recorder {
        epochs: Vec<u32>,
        steps: usize,
        sets: Vec<u32>,
    }

    impl ScriptHost for Recorder {
        fn epoch(&mut self, report: &EpochReport) {
            self.epochs.push(report.epoch);
        }
        fn step(&mut self, _: &StepProgress) {
            self.steps += 1;
        }
        fn checkpoint_saved(&mut self, epoch: u32) -> Option<String> {
            self.sets.push(epoch);
            Some(format!("set-{epoch}"))
        }
    }

    /// Writes its file when dropped.
    struct Done(PathBuf);

    impl Drop for Done {
        fn drop(&mut self) {
            let _ = std::fs::write(&self.0, b"");
        }
    }

    /// A run of a shell "script" (`/bin/sh` as the interpreter) that hands
    /// its socket and token to the test in `probe`, then waits for `done`.
    fn probe_run(dir: &Path) -> ScriptRun {
        let code_dir = dir.join("code");
        std::fs::create_dir_all(&code_dir).unwrap();
        std::fs::create_dir_all(dir.join("output")).unwrap();
        std::fs::write(
            code_dir.join("probe.sh"),
            format!(
                "printf '%s\\n%s\\n' \"${SOCKET_ENV}\" \"${TOKEN_ENV}\" > ../probe.tmp\n\
                 mv ../probe.tmp ../probe\n\
                 while [ ! -e ../done ]; do sleep 0.05; done\n"
            ),
        )
        .unwrap();
        ScriptRun {
            options: ScriptOptions {
                python: PathBuf::from("/bin/sh"),
                ..ScriptOptions::default()
            },
            script: Script {
                program: Program::File {
                    code_dir,
                    entrypoint: "probe.sh".into(),
                },
                args: Vec::new(),
                epochs: 3,
                report_timeout_secs: None,
                distributed: None,
            },
            raw_config: serde_json::json!({"epochs": 3}),
            job_id: vtp_core::JobId::new(),
            attempt: 1,
            job_dir: dir.to_owned(),
            dataset_dir: dir.join("dataset"),
            output: dir.join("output"),
            restored_epoch: None,
        }
    }

    #[test]
    fn the_socket_takes_only_the_runs_token_keeps_rank_0_and_bounds_connections_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let run = probe_run(&dir);
        let served = std::thread::scope(|scope| {
            let serving = scope.spawn(|| {
                let mut host = Recorder::default();
                let end = run.run(&mut host, &|| false);
                (end, host)
            });
            // The script ends when the test does, even when it fails.
            let _done = Done(dir.join("done"));
            let probe = dir.join("probe");
            while !probe.exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let text = std::fs::read_to_string(&probe).unwrap();
            let (socket, token) = text.trim_end().split_once('\n').unwrap();
            let socket = Path::new(socket);

            // Rank 1 reports, steps and saves; none of it reaches the host.
            let mut rank1 = RunClient::connect(socket, token, 1).unwrap();
            assert_eq!(rank1.context().rank, 1);
            let report = Request::Report {
                epoch: 1,
                metrics: metrics(&[("loss", 0.5)]),
            };
            assert!(rank1.call(&report).unwrap().ok);
            let saved = rank1
                .call(&Request::Checkpoint {
                    path: dir.join("nowhere"),
                    epoch: 1,
                    best: false,
                })
                .unwrap();
            assert_eq!(saved.stored, None);
            // Its epochs are checked all the same.
            assert!(rank1.call(&Request::Poll).is_ok());
            let bad = Request::Report {
                epoch: 9,
                metrics: metrics(&[("loss", 0.5)]),
            };
            assert!(rank1.call(&bad).is_err());

            // Rank 0's are kept: the report and a set (not for the final
            // epoch, which is uploaded when the script ends).
            let mut rank0 = RunClient::connect(socket, token, 0).unwrap();
            assert!(rank0.call(&report).unwrap().ok);
            let weights = dir.join("out");
            std::fs::create_dir_all(&weights).unwrap();
            std::fs::write(weights.join("model.pt"), b"weights").unwrap();
            let save = |epoch| Request::Checkpoint {
                path: weights.clone(),
                epoch,
                best: epoch == 1,
            };
            assert_eq!(
                rank0.call(&save(1)).unwrap().stored.as_deref(),
                Some("set-1")
            );
            assert_eq!(rank0.call(&save(3)).unwrap().stored, None);
            assert!(dir.join("output/best.model.pt").is_file());
            // A checkpoint of too many files is refused, naming the bound.
            for i in 0..=MAX_CHECKPOINT_FILES {
                std::fs::write(weights.join(format!("shard-{i}.pt")), b"x").unwrap();
            }
            let too_many = rank0.call(&save(2)).unwrap_err();
            assert!(
                too_many
                    .to_string()
                    .contains(&format!("1 to {MAX_CHECKPOINT_FILES}")),
                "{too_many}"
            );
            // Outside the job's directory: refused.
            let outside = rank0
                .call(&Request::Checkpoint {
                    path: PathBuf::from("/etc/hostname"),
                    epoch: 2,
                    best: false,
                })
                .unwrap_err();
            assert!(outside.to_string().contains("not inside"), "{outside}");

            // Connections are bounded: with the cap held open, one more is
            // dropped before its hello is answered.
            let held: Vec<RunClient> = (2..MAX_CONNECTIONS)
                .map(|_| RunClient::connect(socket, token, 0).unwrap())
                .collect();
            let over = vtp_core::error_chain(&RunClient::connect(socket, token, 0).unwrap_err());
            assert!(over.contains("went away"), "{over}");
            drop(held);
            // A wrong token is refused at hello (once the threads of the
            // connections just closed have ended, and there is room).
            let refused =
                (0..200).find_map(|_| match RunClient::connect(socket, "not-the-token", 0) {
                    Err(e) if vtp_core::error_chain(&e).contains("wrong run token") => Some(e),
                    _ => {
                        std::thread::sleep(Duration::from_millis(20));
                        None
                    }
                });
            assert!(refused.is_some(), "a wrong token was not refused at hello");

            drop(_done);
            serving.join().unwrap()
        });
        let (end, host) = served;
        assert_eq!(end.unwrap(), ScriptEnd::Completed);
        assert_eq!(host.epochs, [1]);
        assert_eq!(host.sets, [1]);
        assert_eq!(host.steps, 0);
    }

    #[test]
    fn requests_round_trip_as_the_sdk_sends_them() {
        let report: Request =
            serde_json::from_str(r#"{"op": "report", "epoch": 2, "metrics": {"loss": 0.5}}"#)
                .unwrap();
        assert_eq!(
            report,
            Request::Report {
                epoch: 2,
                metrics: metrics(&[("loss", 0.5)])
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op": "report", "epoch": 2}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op": "rm", "path": "/"}"#).is_err());
    }
}
