//! Helpers for the workspace-level tests: a TCP proxy that fails on demand
//! (to take Postgres or S3 away from a live backend) and the real
//! `vtp-backend` binary as a child process.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// A loopback TCP proxy in front of a real service, which can be taken down
/// (live connections cut, new ones dropped) and brought back.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct ProxyState {
    down: AtomicBool,
    /// Client-to-server bytes forwarded so far.
    forwarded: AtomicU64,
    /// Go down once this many client-to-server bytes have passed (0: never).
    down_after: AtomicU64,
    connections: Mutex<Vec<AbortHandle>>,
}

impl ProxyState {
    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for handle in self.connections.lock().unwrap().drain(..) {
            handle.abort();
        }
    }
}

impl FaultProxy {
    /// Proxies a fresh loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if shared.down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let conn_state = shared.clone();
                let handle = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    pipe(client, server, conn_state).await;
                });
                shared
                    .connections
                    .lock()
                    .unwrap()
                    .push(handle.abort_handle());
            }
        });
        FaultProxy { addr, state, task }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes the service away (true) or brings it back (false).
    pub fn set_down(&self, down: bool) {
        if down {
            self.state.cut();
        } else {
            // Back for good: a `down_after` already passed would cut the
            // first connection again.
            self.state.down_after.store(0, Ordering::SeqCst);
            self.state.down.store(false, Ordering::SeqCst);
        }
    }

    /// Goes down by itself once `bytes` more client bytes have passed.
    pub fn down_after(&self, bytes: u64) {
        let now = self.state.forwarded.load(Ordering::SeqCst);
        self.state.down_after.store(now + bytes, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.cut();
    }
}

async fn pipe(client: TcpStream, server: TcpStream, state: Arc<ProxyState>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let total = state.forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            let limit = state.down_after.load(Ordering::SeqCst);
            if limit > 0 && total >= limit {
                state.cut();
                break;
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// A service binary of this workspace as a child process, listening on a
/// loopback port; killed on drop.
#[derive(Debug)]
pub struct ServiceProcess {
    child: tokio::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

/// The real `vtp-backend` binary.
pub type BackendProcess = ServiceProcess;

/// The `VTP_*` settings of this test process (the `VTP_TEST_*` ones
/// aside), which a binary under test must not inherit: it gets only what
/// the test gives it.
pub fn ambient_vtp_vars() -> impl Iterator<Item = String> {
    std::env::vars()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("VTP_") && !name.starts_with("VTP_TEST_"))
}

/// Runs `program` with `args` and `env` (and no ambient `VTP_*` setting)
/// to the end; (success, trimmed stdout, stderr).
/// The `vtp` CLI, built by its own crate (`vtp-cli`) into the same
/// directory as this package's binaries; `cargo test --workspace` builds it
/// before any test runs (its own tests need it).
pub fn vtp_cli() -> String {
    let backend = std::path::Path::new(env!("CARGO_BIN_EXE_vtp-backend"));
    let cli = backend.with_file_name(format!("vtp{}", std::env::consts::EXE_SUFFIX));
    assert!(
        cli.is_file(),
        "{} is missing: build it with `cargo build -p vtp-cli` (cargo test --workspace does)",
        cli.display()
    );
    cli.display().to_string()
}

/// The `vtp-trainer-service` binary (`vtp-trainer`'s, features `service`
/// and `torch`), next to `vtp-backend` in the target directory.
pub fn trainer_bin() -> String {
    let backend = std::path::Path::new(env!("CARGO_BIN_EXE_vtp-backend"));
    let trainer = backend.with_file_name(format!(
        "vtp-trainer-service{}",
        std::env::consts::EXE_SUFFIX
    ));
    assert!(
        trainer.is_file(),
        "{} is missing: build it with `cargo build -p vtp-trainer --features service,torch` \
         (cargo test --workspace --all-features does)",
        trainer.display()
    );
    trainer.display().to_string()
}

/// Whether a Prometheus text page has samples of `name` (a histogram's
/// as `_bucket`, `_sum`, `_count`).
pub fn exports(page: &str, name: &str) -> bool {
    page.lines().any(|line| {
        line.strip_prefix(name).is_some_and(|rest| {
            rest.starts_with(' ')
                || rest.starts_with('{')
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| rest.starts_with(suffix))
        })
    })
}

pub fn run_binary(program: &str, env: &[(&str, String)], args: &[&str]) -> (bool, String, String) {
    let mut command = std::process::Command::new(program);
    for name in ambient_vtp_vars() {
        command.env_remove(name);
    }
    let out = command
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl ServiceProcess {
    /// Starts `vtp-backend --listen 127.0.0.1:0` with `envs` (and no other
    /// `VTP_*` settings); waits until it listens.
    pub async fn start(envs: &[(&str, String)]) -> Self {
        Self::spawn(
            env!("CARGO_BIN_EXE_vtp-backend"),
            &["--listen", "127.0.0.1:0"],
            envs,
            "vtp-backend listening on ",
        )
        .await
    }

    /// Starts `program` with `args` and `envs`; waits for the stdout line
    /// starting with `prefix` and takes the URL after it.
    pub async fn spawn(
        program: &str,
        args: &[&str],
        envs: &[(&str, String)],
        prefix: &str,
    ) -> Self {
        let mut command = tokio::process::Command::new(program);
        command.args(args);
        for name in ambient_vtp_vars() {
            command.env_remove(name);
        }
        command
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .env("VTP_LOG", "info,vtp_server=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix(prefix) {
                    return url.trim().to_owned();
                }
            }
            panic!("{program} exited before listening");
        })
        .await
        .unwrap_or_else(|_| panic!("{program} listens within a minute"));
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServiceProcess { child, url }
    }

    /// `url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Process ids whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
            == Some(pid)
        {
            out.push(child);
        }
    }
    out
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The status and JSON body of a response (`null` when the body is not JSON).
pub async fn json_of(response: reqwest::Response) -> (reqwest::StatusCode, serde_json::Value) {
    let status = response.status();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// Uploads a zip of generated shapes (`per_class` images of each of three
/// classes, from `seed`) through the backend's `/datasets/upload` as
/// `user`; returns the dataset URI.
pub async fn upload_shapes(
    http: &reqwest::Client,
    backend: &ServiceProcess,
    user: &str,
    per_class: usize,
    seed: u64,
) -> String {
    upload_shapes_to(http, &backend.url, user, per_class, seed).await
}

/// [`upload_shapes`] to the backend (or balancer) at `base`.
pub async fn upload_shapes_to(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    per_class: usize,
    seed: u64,
) -> String {
    let dir = tempfile::tempdir().unwrap();
    vtp_trainer::testing::shapes_dataset(&dir.path().join("shapes"), per_class, seed);
    let archive = dir.path().join("shapes.zip");
    vtp_trainer::testing::zip_dir(&dir.path().join("shapes"), &archive);
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(std::fs::read(&archive).unwrap())
                .file_name("shapes.zip"),
        )
        .text("user_id", user.to_owned())
        .text("dataset_name", "shapes");
    let response = http
        .post(format!("{base}/datasets/upload"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 201, "{body}");
    body["s3_uri"].as_str().unwrap().to_owned()
}

/// The job's recorded epochs, each with when it was recorded (to tell an
/// epoch trained again from one recorded once).
pub async fn recorded_epochs(
    http: &reqwest::Client,
    backend: &ServiceProcess,
    id: &str,
) -> Vec<(u64, String)> {
    let response = http
        .get(backend.at(&format!("/training/jobs/{id}/metrics")))
        .send()
        .await
        .unwrap();
    let (_, metrics) = json_of(response).await;
    metrics
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|m| {
                    (
                        m["epoch"].as_u64().unwrap(),
                        m["recorded_at"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A trainer report posted as a trainer posts it: signed with the job's
/// callback secret (Standard Webhooks headers).
pub fn signed(
    http: &reqwest::Client,
    url: &str,
    secret: &vtp_core::CallbackSecret,
    body: &serde_json::Value,
) -> reqwest::RequestBuilder {
    let bytes = body.to_string();
    let id = format!("test-{}", uuid::Uuid::new_v4());
    let mut request = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    for (name, value) in secret.headers(&id, bytes.as_bytes()).unwrap() {
        request = request.header(name, value);
    }
    request.body(bytes)
}

/// A loopback TCP balancer in front of several backends: each connection
/// goes to the next backend in turn that accepts it, as a Kubernetes
/// Service does for its ready endpoints. Backends are named after the
/// balancer is listening, so they can be given its URL as their public one.
#[derive(Debug)]
pub struct Balancer {
    addr: SocketAddr,
    targets: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// Listens on a fresh loopback port, with no backend yet.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let targets: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let shared = targets.clone();
        let task = tokio::spawn(async move {
            let next = AtomicU64::new(0);
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let targets = shared.lock().unwrap().clone();
                let first = next.fetch_add(1, Ordering::SeqCst) as usize;
                tokio::spawn(async move {
                    for i in 0..targets.len() {
                        let target = targets[(first + i) % targets.len()];
                        if let Ok(mut server) = TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer {
            addr,
            targets,
            task,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends connections to `target` too.
    pub fn add(&self, url: &str) {
        let addr = url.trim_start_matches("http://").parse().unwrap();
        self.targets.lock().unwrap().push(addr);
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
