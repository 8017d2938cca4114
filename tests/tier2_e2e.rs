//! Tier 2 end to end: the same `vtp-backend` binary, switched to Kubernetes
//! by environment alone (`VTP_LAUNCHER=kubernetes`, a kubeconfig), against a
//! fake API server whose "kubelet" runs each Job's container as a local
//! `vtp-trainer-service run-job` process with the Job's environment and its
//! Secret; Postgres and Garage are real. Then the backend goes down while
//! Jobs fail and vanish, and after the restart the reconciler ends the
//! failed attempt and the relauncher gives both jobs a new Job.

#[path = "support/fake_kube.rs"]
mod fake_kube;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_kube::FakeKube;
use serde_json::{Value, json};
use support::ServiceProcess;
use vtp_storage::testing::{TestDatabase, TestS3};

const NAMESPACE: &str = "vtp";
const SECRET: &str = "vtp-s3";

struct Env {
    _db: TestDatabase,
    s3: TestS3,
    blob_url: String,
    db_url: String,
    work: tempfile::TempDir,
    http: reqwest::Client,
    kube: FakeKube,
    /// The pods this test's kubelet runs, killed with everything they
    /// started when the test ends, passed or failed: a pod's trainer whose
    /// backend is gone would retry its reports for ever.
    pods: Pods,
}

impl Drop for Env {
    fn drop(&mut self) {
        let alive: Vec<u32> = self.pods.1.lock().unwrap().iter().copied().collect();
        for pid in alive {
            kill_tree(pid);
        }
    }
}

/// SIGKILLs `pid` and every process below it (a pod's trainer, its
/// script's process group, torchrun's ranks), parents first.
fn kill_tree(pid: u32) {
    let mut tree = vec![pid];
    let mut at = 0;
    while at < tree.len() {
        tree.extend(support::children_of(tree[at]));
        at += 1;
    }
    let pids: Vec<String> = tree.iter().map(u32::to_string).collect();
    let _ = std::process::Command::new("kill")
        .arg("-KILL")
        .args(&pids)
        .status();
}

impl Env {
    async fn new() -> Option<Env> {
        let db = TestDatabase::create().await?;
        let s3 = TestS3::from_env()?;
        Some(Env {
            db_url: db.url().to_owned(),
            _db: db,
            blob_url: s3.fresh_url(),
            s3,
            work: tempfile::tempdir().unwrap(),
            http: reqwest::Client::new(),
            kube: FakeKube::start().await,
            pods: Pods::default(),
        })
    }

    /// The backend's environment: its own stores, and the launcher chosen
    /// by configuration alone.
    fn backend_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.s3.env_for(&self.blob_url);
        env.extend([
            ("VTP_DATABASE_URL", self.db_url.clone()),
            ("VTP_LAUNCHER", "kubernetes".to_owned()),
            (
                "KUBECONFIG",
                self.kube
                    .kubeconfig(self.work.path(), NAMESPACE)
                    .display()
                    .to_string(),
            ),
            ("VTP_K8S_NAMESPACE", NAMESPACE.to_owned()),
            ("VTP_K8S_IMAGE", "vtp-trainer:e2e".to_owned()),
            ("VTP_K8S_S3_SECRET", SECRET.to_owned()),
            ("VTP_K8S_RECONCILE_SECS", "1".to_owned()),
            ("VTP_K8S_SETTLE_SECS", "0".to_owned()),
            ("VTP_K8S_MAX_MEMORY", "2Gi".to_owned()),
        ]);
        env
    }

    /// The Secret the pods' `envFrom` names: the S3 credentials.
    fn secret(&self) -> BTreeMap<String, String> {
        self.s3
            .env_for(&self.blob_url)
            .into_iter()
            .filter(|(k, _)| k.contains("ACCESS_KEY"))
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let (status, body) = support::json_of(request.send().await.unwrap()).await;
        (status.as_u16(), body)
    }

    async fn upload_shapes(&self, backend: &ServiceProcess) -> String {
        support::upload_shapes(&self.http, backend, "tier2", 30, 5).await
    }

    /// The tests' own PyTorch scripts (`vtp.run()` inside), zipped and
    /// uploaded as the user's code; its `s3_uri`.
    async fn upload_scripts(&self, backend: &ServiceProcess) -> Value {
        let dir = tempfile::tempdir().unwrap();
        let scripts =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../vtp-py/tests/scripts");
        let archive = dir.path().join("code.zip");
        vtp_trainer::testing::zip_dir(&scripts, &archive);
        let form = reqwest::multipart::Form::new()
            .part(
                "file",
                reqwest::multipart::Part::bytes(std::fs::read(&archive).unwrap())
                    .file_name("code.zip"),
            )
            .text("user_id", "tier2")
            .text("code_name", "scripts");
        let (status, code) = self
            .json(self.http.post(backend.at("/code/upload")).multipart(form))
            .await;
        assert_eq!(status, 201, "{code}");
        code["s3_uri"].clone()
    }

    async fn create_and_start(&self, backend: &ServiceProcess, dataset: &str) -> String {
        self.create_and_start_with(backend, &job_body(dataset, 2))
            .await
    }

    /// Creates and starts the job `body` describes; returns its id.
    async fn create_and_start_with(&self, backend: &ServiceProcess, body: &Value) -> String {
        let (status, job) = self
            .json(self.http.post(backend.at("/training/jobs")).json(body))
            .await;
        assert_eq!(status, 201, "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        let (status, body) = self
            .json(
                self.http
                    .post(backend.at(&format!("/training/jobs/{id}/start"))),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        id
    }

    /// The job's recorded metrics, one row per epoch.
    async fn metrics(&self, backend: &ServiceProcess, id: &str) -> Value {
        let (status, metrics) = self
            .json(
                self.http
                    .get(backend.at(&format!("/training/jobs/{id}/metrics"))),
            )
            .await;
        assert_eq!(status, 200, "{metrics}");
        metrics
    }

    /// Polls the job until `done`.
    async fn wait_for(
        &self,
        backend: &ServiceProcess,
        id: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        for _ in 0..3000 {
            // A kubelet that failed an assertion fails the test here.
            self.kube.check_kubelet();
            let (_, job) = self
                .json(self.http.get(backend.at(&format!("/training/jobs/{id}"))))
                .await;
            if done(&job) {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {id} did not get there");
    }

    /// Polls the fake cluster until the Job `name` exists and `done` holds.
    async fn wait_for_k8s_job(&self, name: &str, done: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..1200 {
            self.kube.check_kubelet();
            if let Some(k8s) = self.kube.job(name)
                && done(&k8s)
            {
                return k8s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the Kubernetes Job {name} did not get there: {:?}",
            self.kube.job(name)
        );
    }

    async fn wait_terminal(&self, backend: &ServiceProcess, id: &str) -> Value {
        self.wait_for(backend, id, |job| {
            matches!(
                job["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
        .await
    }
}

/// The kubelet and the Job controller of the fake cluster: runs each Job's
/// container as `vtp-trainer-service` with the container's args and env
/// plus the Secret, each pod in a work directory of its own (an
/// `emptyDir`), and records the Job's outcome; an evicted pod is replaced.
struct Kubelet {
    kube: FakeKube,
    secret: BTreeMap<String, String>,
    work: std::path::PathBuf,
    pods: Pods,
}

/// The pods the kubelet runs, by Job name.
#[derive(Clone, Default)]
struct Pods(
    Arc<Mutex<HashMap<String, PodState>>>,
    /// The pods' processes not yet ended.
    Arc<Mutex<HashSet<u32>>>,
);

#[derive(Default)]
struct PodState {
    /// The process of the Job's current pod.
    pid: u32,
    /// How many pods the Job has had.
    started: usize,
    /// Set while the current pod is being evicted.
    evicting: bool,
    /// An Indexed Job's pods still running, by completion index.
    indexed: BTreeMap<u32, u32>,
    /// Its pods that succeeded.
    succeeded: u32,
    /// Whether one of its pods failed (the Job with it).
    failed: bool,
    /// The Job (by uid) those pods are of: a relaunch makes a Job of the
    /// same name while the pods of the one it replaced wind down.
    uid: String,
}

impl Pods {
    /// Evicts the Job's running pod as a node drain does: SIGTERM to its
    /// process; when it has exited, the pod fails with a `DisruptionTarget`
    /// condition and the Job controller starts a replacement.
    fn evict(&self, name: &str) {
        let pid = {
            let mut pods = self.0.lock().unwrap();
            let pod = pods.get_mut(name).expect("the Job has a pod");
            pod.evicting = true;
            pod.pid
        };
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "the pod's process was running");
    }

    /// How many pods the Job `name` has had.
    fn started(&self, name: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |pod| pod.started)
    }
}

fn run_pods(env: &Env) -> Pods {
    let pods = env.pods.clone();
    let kubelet = Arc::new(Kubelet {
        kube: env.kube.clone(),
        secret: env.secret(),
        work: env.work.path().to_path_buf(),
        pods: pods.clone(),
    });
    env.kube
        .run_pods_with(move |job: &Value| start_pod(&kubelet, job.clone()));
    pods
}

/// Starts the Job's pods: one, or one per completion index of an Indexed
/// Job. The pods of an Indexed Job find pod 0 by its name under the Job's
/// headless Service; this cluster's DNS is loopback, and since its pods
/// share one network namespace, each Job's rendezvous gets a port of its own.
fn start_pod(kubelet: &Arc<Kubelet>, job: Value) {
    if job["spec"]["completionMode"] == "Indexed" {
        let completions = job["spec"]["completions"].as_u64().unwrap() as u32;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // A new Job of that name (a relaunch) starts with no pods.
        {
            let mut pods = kubelet.pods.0.lock().unwrap();
            let state = pods
                .entry(job["metadata"]["name"].as_str().unwrap().to_owned())
                .or_default();
            state.indexed.clear();
            state.succeeded = 0;
            state.failed = false;
            state.uid = job["metadata"]["uid"].as_str().unwrap().to_owned();
        }
        for index in 0..completions {
            start_pod_of(kubelet, job.clone(), Some((index, port)));
        }
    } else {
        start_pod_of(kubelet, job, None);
    }
}

fn start_pod_of(kubelet: &Arc<Kubelet>, job: Value, indexed: Option<(u32, u16)>) {
    let name = job["metadata"]["name"].as_str().unwrap().to_owned();
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], SECRET);
    let mut command = std::process::Command::new(support::trainer_bin());
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    // What the trainer image sets itself: its Python environment (where
    // torch and the `vtp` package are), offline.
    for image_env in ["VIRTUAL_ENV", "YOLO_OFFLINE"] {
        if let Ok(value) = std::env::var(image_env) {
            command.env(image_env, value);
        }
    }
    for arg in container["args"].as_array().unwrap() {
        command.arg(arg.as_str().unwrap());
    }
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        if let Some(value) = var["value"].as_str() {
            command.env(name, value);
            continue;
        }
        // A secretKeyRef: the job's own callback Secret, never a literal.
        let from = &var["valueFrom"]["secretKeyRef"];
        let secret = kubelet
            .kube
            .secret(from["name"].as_str().unwrap())
            .expect("the job's Secret exists before its pod runs");
        command.env(
            name,
            secret["stringData"][from["key"].as_str().unwrap()]
                .as_str()
                .unwrap(),
        );
    }
    let pod = kubelet.pods.started(&name) + 1;
    let mut work = kubelet.work.join(format!("{name}-pod{pod}"));
    if let Some((index, port)) = indexed {
        // What Kubernetes sets in an Indexed Job's pod, and what its DNS
        // and network namespace would give: pod 0's name resolves (here to
        // loopback) under the Service the pod's subdomain names.
        let master = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|var| var["name"] == "VTP_MASTER_ADDR")
            .and_then(|var| var["value"].as_str())
            .expect("an Indexed Job's pods are told where pod 0 is");
        let subdomain = job["spec"]["template"]["spec"]["subdomain"]
            .as_str()
            .unwrap();
        assert_eq!(master, format!("{name}-0.{subdomain}"));
        command
            .env("JOB_COMPLETION_INDEX", index.to_string())
            .env("VTP_MASTER_ADDR", "127.0.0.1")
            .env("VTP_MASTER_PORT", port.to_string());
        work = kubelet.work.join(format!("{name}-pod{pod}-{index}"));
    }
    command
        .envs(&kubelet.secret)
        .env("VTP_WORK_DIR", work)
        .env("VTP_LOG", "info");
    let child = command.spawn().expect("the trainer binary runs");
    let pid = child.id();
    kubelet.pods.1.lock().unwrap().insert(pid);
    {
        let mut pods = kubelet.pods.0.lock().unwrap();
        let state = pods.entry(name.clone()).or_default();
        state.pid = child.id();
        match indexed {
            Some((index, _)) => {
                state.indexed.insert(index, child.id());
                if index == 0 {
                    state.started = pod;
                }
            }
            None => state.started = pod,
        }
    }
    let kubelet = kubelet.clone();
    std::thread::spawn(move || {
        // What the pod's watcher asserts fails the test (through
        // `check_kubelet`), not just this thread.
        let watcher = kubelet.clone();
        let watched =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || match indexed {
                Some((index, _)) => watch_indexed_pod(&kubelet, child, &name, &job, index),
                None => watch_pod(&kubelet, child, name, job, pod),
            }));
        // Waited for by now: its pid is free for another process.
        watcher.pods.1.lock().unwrap().remove(&pid);
        if let Err(panic) = watched {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "the pod watcher panicked".to_owned());
            watcher.kube.kubelet_failed(message);
        }
    });
}

/// Waits for a pod of an Indexed Job and plays what the Job controller
/// does with its end: the Job completes when every index has succeeded, and
/// fails with the first pod that fails (backoff limit 0), whose siblings
/// are then terminated.
fn watch_indexed_pod(
    kubelet: &Arc<Kubelet>,
    mut child: std::process::Child,
    name: &str,
    job: &Value,
    index: u32,
) {
    let status = child.wait().unwrap();
    let completions = job["spec"]["completions"].as_u64().unwrap() as u32;
    let uid = job["metadata"]["uid"].as_str().unwrap();
    let (ended, siblings) = {
        let mut pods = kubelet.pods.0.lock().unwrap();
        let state = pods.get_mut(name).unwrap();
        if state.uid != uid {
            // A pod of a Job since replaced: its end is no news.
            return;
        }
        state.indexed.remove(&index);
        if state.failed {
            (None, Vec::new())
        } else if status.success() {
            state.succeeded += 1;
            ((state.succeeded == completions).then_some(true), Vec::new())
        } else {
            state.failed = true;
            (Some(false), state.indexed.values().copied().collect())
        }
    };
    for pid in siblings {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    // The Job may be gone (a cancel, a relaunch) or replaced meanwhile.
    if kubelet
        .kube
        .job(name)
        .is_none_or(|current| current["metadata"]["uid"] != uid)
    {
        return;
    }
    match ended {
        Some(true) => kubelet
            .kube
            .set_condition(name, "Complete", "Completed", ""),
        Some(false) => kubelet.kube.set_condition(
            name,
            "Failed",
            "BackoffLimitExceeded",
            &format!("pod {index} exited: {status}"),
        ),
        None => {}
    }
}

/// Waits for the pod's process and plays what the Job controller does
/// with its end.
fn watch_pod(
    kubelet: &Arc<Kubelet>,
    mut child: std::process::Child,
    name: String,
    job: Value,
    pod: usize,
) {
    {
        let status = child.wait().unwrap();
        let evicted = std::mem::take(
            &mut kubelet
                .pods
                .0
                .lock()
                .unwrap()
                .get_mut(&name)
                .unwrap()
                .evicting,
        );
        if evicted {
            // What the Job controller does with a disrupted pod under the
            // Job's podFailurePolicy: `Ignore` starts a replacement and
            // counts no failure against the backoff limit.
            let rules = job["spec"]["podFailurePolicy"]["rules"].to_string();
            assert!(
                rules.contains("DisruptionTarget") && rules.contains("Ignore"),
                "the Job ignores disruptions: {rules}"
            );
            kubelet.kube.add_pod(
                &name,
                &format!("{name}-pod{pod}"),
                json!({"phase": "Failed", "reason": "Evicted", "conditions": [
                    {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]}),
            );
            start_pod(kubelet, job);
            return;
        }
        if status.success() {
            kubelet
                .kube
                .set_condition(&name, "Complete", "Completed", "");
        } else {
            kubelet.kube.set_condition(
                &name,
                "Failed",
                "BackoffLimitExceeded",
                &format!("pod exited: {status}"),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_as_a_kubernetes_job_on_the_same_backend_binary() {
    let Some(env) = Env::new().await else { return };
    run_pods(&env);
    let backend = ServiceProcess::start(&env.backend_env()).await;
    let (_, health) = env.json(env.http.get(backend.at("/health"))).await;
    assert_eq!(health["launcher"], "kubernetes", "{health}");

    let dataset = env.upload_shapes(&backend).await;
    // Beyond the operator's maxima (VTP_K8S_MAX_MEMORY=2Gi, one GPU by
    // default) or not a quantity: refused at create, naming the field.
    for (resources, field) in [
        (json!({"memory": "3Gi"}), "config.resources.memory"),
        (json!({"memory": "2.5G"}), "config.resources.memory"),
        (json!({"gpu": 2}), "config.resources.gpu"),
        (json!({"cpu": "9"}), "config.resources.cpu"),
        (json!({"cpu": "lots"}), "config.resources.cpu"),
    ] {
        let body = json!({"user_id": "tier2", "model_name": "small_cnn", "framework": "tch",
            "dataset_s3_uri": dataset, "config": {"resources": resources}});
        let (status, refused) = env
            .json(env.http.post(backend.at("/training/jobs")).json(&body))
            .await;
        assert_eq!(status, 422, "{resources}: {refused}");
        assert_eq!(refused["error"]["field"], field, "{resources}: {refused}");
    }
    let id = env.create_and_start(&backend, &dataset).await;
    let job = env.wait_terminal(&backend, &id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert!(
        job["checkpoint_s3_uri"]
            .as_str()
            .unwrap()
            .ends_with("/best.safetensors")
    );
    let metrics = env.metrics(&backend, &id).await;
    assert_eq!(metrics.as_array().unwrap().len(), 2, "{metrics}");

    let created = env.kube.job(&format!("vtp-{id}")).expect("one Job per job");
    assert_eq!(created["metadata"]["labels"]["vtp.dev/job-id"], id.as_str());
    let posts = env
        .kube
        .seen()
        .iter()
        .filter(|s| s.method == "POST" && s.name == format!("vtp-{id}"))
        .count();
    assert_eq!(posts, 1, "no second Job");
    assert!(
        !created.to_string().contains("whsec_"),
        "the callback secret is not in the Job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_job_runs_the_users_script_in_its_kubernetes_job() {
    let Some(env) = Env::new().await else { return };
    run_pods(&env);
    let backend = ServiceProcess::start(&env.backend_env()).await;
    let dataset = env.upload_shapes(&backend).await;
    let code = env.upload_scripts(&backend).await;
    let body = json!({"user_id": "tier2", "model_name": "tiny-mlp", "framework": "python",
        "dataset_s3_uri": dataset, "config": {"code_s3_uri": code,
        "entrypoint": "train.py", "epochs": 2}});
    let id = env.create_and_start_with(&backend, &body).await;
    let job = env.wait_terminal(&backend, &id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert!(
        job["checkpoint_s3_uri"]
            .as_str()
            .unwrap()
            .ends_with("/best.model.pt"),
        "{job}"
    );
    let metrics = env.metrics(&backend, &id).await;
    let rows = metrics.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{metrics}");
    // The script saw none of the pod's secrets (the S3 keys from envFrom,
    // the start request and callback secret from the job's Secret).
    assert!(rows.iter().all(|row| row["leaked"] == 0.0), "{metrics}");
    let created = env.kube.job(&format!("vtp-{id}")).unwrap();
    assert_eq!(
        created["spec"]["template"]["spec"]["containers"][0]["image"], "vtp-trainer:e2e",
        "no config.image: the trainer's own"
    );
    assert!(!created.to_string().contains("whsec_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_job_runs_across_two_machines_and_a_machine_that_dies_relaunches_both() {
    let Some(env) = Env::new().await else { return };
    let pods = run_pods(&env);
    let backend = ServiceProcess::start(&env.backend_env()).await;
    let dataset = env.upload_shapes(&backend).await;
    let code = env.upload_scripts(&backend).await;
    // Two machines of one rank each (gloo): pod 1's rank (global rank 1)
    // pauses after epoch 2 of the first attempt, and is killed there.
    let pid_file = env.work.path().join("rank1.pid");
    let body = json!({"user_id": "tier2", "model_name": "tiny-ddp", "framework": "python",
        "dataset_s3_uri": dataset, "config": {"code_s3_uri": code, "entrypoint": "ddp.py",
        "epochs": 4, "batch": 8, "distributed": {"nproc_per_node": 1, "nnodes": 2},
        "mode": "pause", "pause_after": 2, "pause_rank": 1, "pid_file": pid_file}});
    let id = env.create_and_start_with(&backend, &body).await;
    let name = format!("vtp-{id}");
    let k8s = env.wait_for_k8s_job(&name, |_| true).await;
    assert_eq!(k8s["spec"]["completionMode"], "Indexed", "{k8s}");
    assert_eq!(k8s["spec"]["completions"], 2);
    // The Service and the NetworkPolicy are owned by the Job, so they are
    // created just after it.
    let mut service = None;
    for _ in 0..200 {
        service = env.kube.service(&format!("{name}-1"));
        if service.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let service = service.expect("the attempt's rendezvous Service");
    assert_eq!(service["spec"]["clusterIP"], "None");
    let mut waited = 0;
    let pid = loop {
        env.kube.check_kubelet();
        waited += 1;
        assert!(
            waited < 3000,
            "rank 1 never paused: {:?}",
            env.kube.job(&name)
        );
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
        {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Node 1's rank dies: its pod fails, the Job with it; node 0's rank
    // loses its peer. The attempt ends, and the relaunch (a new Indexed
    // Job, a new Service) resumes both machines from epoch 2's set.
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let job = env.wait_terminal(&backend, &id).await;
    assert_eq!(job["status"], "completed", "{job}");
    // ddp.py saves no best: the last set is the job's checkpoint.
    assert!(
        job["checkpoint_s3_uri"]
            .as_str()
            .unwrap()
            .ends_with("/last.model.pt"),
        "{job}"
    );
    let metrics = env.metrics(&backend, &id).await;
    let rows = metrics.as_array().unwrap();
    let column = |key: &str| {
        rows.iter()
            .map(|row| row[key].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    // Every epoch once, each from rank 0 of a world of two.
    assert_eq!(column("epoch"), [1.0, 2.0, 3.0, 4.0], "{metrics}");
    assert!(
        rows.iter()
            .all(|row| row["rank"] == 0.0 && row["world"] == 2.0),
        "{metrics}"
    );
    assert_eq!(column("attempt"), [1.0, 1.0, 2.0, 2.0], "{metrics}");
    assert_eq!(column("resumed_from"), [0.0, 0.0, 2.0, 2.0], "{metrics}");
    assert!(env.kube.service(&format!("{name}-2")).is_some());
    // Pods: two per attempt.
    assert_eq!(pods.started(&name), 2, "the second attempt's pods");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_backend_restart_jobs_whose_kubernetes_job_failed_or_vanished_are_relaunched() {
    let Some(env) = Env::new().await else { return };
    // No kubelet: the Jobs are created and nothing runs them.
    let backend = ServiceProcess::start(&env.backend_env()).await;
    let dataset = env.upload_shapes(&backend).await;
    let evicted = env.create_and_start(&backend, &dataset).await;
    let vanished = env.create_and_start(&backend, &dataset).await;
    let waiting = env.create_and_start(&backend, &dataset).await;
    // The queue's dispatcher creates the Jobs a moment after the starts.
    for id in [&evicted, &vanished, &waiting] {
        env.wait_for_k8s_job(&format!("vtp-{id}"), |_| true).await;
    }
    backend.kill().await;

    // While the backend is down: one pod is evicted and its Job fails, one
    // Job is deleted by hand, one keeps waiting for a node.
    let name = format!("vtp-{evicted}");
    env.kube.set_condition(
        &name,
        "Failed",
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
    );
    env.kube.add_pod(&name, &format!("{name}-x1"), json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}));
    env.kube.vanish(&format!("vtp-{vanished}"));

    let backend = ServiceProcess::start(&env.backend_env()).await;
    // The evicted job's pods crashed out of retries: its attempt ends and
    // the next one gets a Job of its own, in place of the failed one.
    let job = env
        .wait_for(&backend, &evicted, |job| job["attempt"] == 2)
        .await;
    assert_eq!(job["status"], "queued", "{job}");
    assert!(
        job["attempts"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("Evicted"),
        "{job}"
    );
    env.wait_for_k8s_job(&format!("vtp-{evicted}"), |k8s| {
        k8s["metadata"]["labels"]["vtp.dev/attempt"] == "2" && k8s["status"]["conditions"].is_null()
    })
    .await;
    // The job whose Job vanished before it started is launched again.
    env.wait_for_k8s_job(&format!("vtp-{vanished}"), |_| true)
        .await;
    let (_, job) = env
        .json(
            env.http
                .get(backend.at(&format!("/training/jobs/{vanished}"))),
        )
        .await;
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_i64()),
        (Some("queued"), Some(1)),
        "{job}"
    );
    let (_, job) = env
        .json(
            env.http
                .get(backend.at(&format!("/training/jobs/{waiting}"))),
        )
        .await;
    assert_eq!(
        job["status"], "queued",
        "its Job still runs: adopted, {job}"
    );

    // Cancel: the Job is deleted in the foreground; with no trainer to
    // report, the reconciler settles it as cancelled.
    let (status, job) = env
        .json(
            env.http
                .delete(backend.at(&format!("/training/jobs/{waiting}"))),
        )
        .await;
    assert_eq!(status, 200, "{job}");
    let job = env.wait_terminal(&backend, &waiting).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(env.kube.job(&format!("vtp-{waiting}")).is_none());
}

/// The body of a job of `epochs` epochs on `dataset`.
fn job_body(dataset: &str, epochs: u32) -> Value {
    let config = json!({"epochs": epochs, "image_size": 16, "batch_size": 16, "threads": 1, "workers": 1,
        "hflip": false, "resources": {"cpu": "1", "memory": "1Gi"}});
    json!({"user_id": "tier2", "model_name": "small_cnn", "framework": "tch", "dataset_s3_uri": dataset, "config": config})
}

impl Env {
    /// The job's recorded epochs with when each was recorded.
    async fn epochs(&self, backend: &ServiceProcess, id: &str) -> Vec<(u64, String)> {
        support::recorded_epochs(&self.http, backend, id).await
    }

    /// How many times the backend created the Kubernetes Job `name`.
    fn job_posts(&self, name: &str) -> usize {
        self.kube
            .seen()
            .iter()
            .filter(|s| s.method == "POST" && s.name == name)
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_evicted_mid_run_is_replaced_and_the_job_resumes_within_its_attempt() {
    let Some(env) = Env::new().await else { return };
    let pods = run_pods(&env);
    let backend = ServiceProcess::start(&env.backend_env()).await;
    let dataset = support::upload_shapes(&env.http, &backend, "tier2", 20, 5).await;
    let epochs = 16;
    let id = env
        .create_and_start_with(&backend, &job_body(&dataset, epochs))
        .await;
    let name = format!("vtp-{id}");
    // Mid-run, with a checkpoint set stored: the node is drained.
    env.wait_for(&backend, &id, |job| {
        job["last_checkpoint_s3_uri"].is_string() && job["progress"].as_f64() < Some(0.5)
    })
    .await;
    let before = env.epochs(&backend, &id).await;
    assert!(!before.is_empty());
    pods.evict(&name);

    let job = env.wait_terminal(&backend, &id).await;
    assert_eq!(job["status"], "completed", "{job}");
    // The replacement pod ran the same attempt: no retry was used.
    assert_eq!(pods.started(&name), 2, "one replacement pod");
    assert_eq!(job["attempt"], 1, "{job}");
    assert_eq!(job["attempts"], json!([]), "{job}");
    assert_eq!(env.job_posts(&name), 1, "one Kubernetes Job");
    // Every epoch once; those recorded before the eviction not trained again.
    let after = env.epochs(&backend, &id).await;
    let numbers: Vec<u64> = after.iter().map(|(epoch, _)| *epoch).collect();
    assert_eq!(numbers, (1..=u64::from(epochs)).collect::<Vec<_>>());
    for (epoch, recorded_at) in &before {
        let again = &after[usize::try_from(*epoch).unwrap() - 1];
        assert_eq!(&again.1, recorded_at, "epoch {epoch} was trained twice");
    }
}

/// The backend is SIGKILLed while it is held at the fail point `point` (set
/// to `return`: the start request, or the queue's dispatcher, hangs there);
/// the client then retries both requests under their `Idempotency-Key`s
/// against the restarted backend. The job must run once: one Kubernetes
/// Job, one attempt, every epoch once.
#[cfg(feature = "failpoints")]
async fn backend_killed_at(point: &str) {
    let Some(env) = Env::new().await else { return };
    run_pods(&env);
    // The restarted backend listens where the first did: the pod's reports
    // reach it.
    let listen = format!("127.0.0.1:{}", support::free_port());
    let start_backend = |failpoints: Option<String>| {
        let mut vars = env.backend_env();
        // While the dispatcher is held between recording a launch and
        // making it, the reconciler must not take the missing Job for a
        // vanished one (in production the settle time, a minute, covers
        // that gap; these tests otherwise run with none).
        vars.push(("VTP_K8S_SETTLE_SECS", "5".to_owned()));
        vars.extend(failpoints.map(|points| ("FAILPOINTS", points)));
        let listen = listen.clone();
        async move {
            ServiceProcess::spawn(
                env!("CARGO_BIN_EXE_vtp-backend"),
                &["--listen", &listen],
                &vars,
                "vtp-backend listening on ",
            )
            .await
        }
    };
    let backend = start_backend(Some(format!("{point}=return"))).await;
    let dataset = env.upload_shapes(&backend).await;
    let body = job_body(&dataset, 3);
    let create = |backend: &ServiceProcess, body: &Value| {
        env.http
            .post(backend.at("/training/jobs"))
            .header("Idempotency-Key", "create-once")
            .json(body)
    };
    let (status, job) = env.json(create(&backend, &body)).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let name = format!("vtp-{id}");
    let start = |backend: &ServiceProcess| {
        env.http
            .post(backend.at(&format!("/training/jobs/{id}/start")))
            .header("Idempotency-Key", "start-once")
    };
    let held = tokio::spawn(start(&backend).send());
    match point {
        // Queued, the start unanswered: the queue's dispatcher (which
        // also polls) may or may not launch it before the kill; either way
        // it must run once.
        "start-after-queue" => {
            env.wait_for(&backend, &id, |job| job["status"] != "pending")
                .await;
        }
        "dispatch-after-record" => {
            env.wait_for(&backend, &id, |job| job["status"] == "queued")
                .await;
            // (Held before the launch: give the dispatcher a moment to get there.)
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(env.kube.job(&name).is_none(), "not launched yet");
        }
        _ => {
            env.wait_for_k8s_job(&name, |_| true).await;
        }
    }
    backend.kill().await;
    let answered = held.await.unwrap();
    if point == "start-after-queue" {
        assert!(answered.is_err(), "the start got no answer");
    } else {
        assert_eq!(answered.unwrap().status(), 202, "the start was answered");
    }

    let backend = start_backend(None).await;
    // The retried create answers with the job it made; the retried start
    // with the job it started, launching nothing.
    let again = create(&backend, &body).send().await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let (_, again) = support::json_of(again).await;
    assert_eq!(again["id"], id.as_str(), "{again}");
    let again = start(&backend).send().await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    env.kube.check_kubelet();
    // Another request under a used key is refused, naming the header.
    let (status, refused) = env.json(create(&backend, &job_body(&dataset, 4))).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["field"], "Idempotency-Key", "{refused}");

    let job = env.wait_terminal(&backend, &id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["attempt"], 1, "{job}");
    assert_eq!(job["attempts"], json!([]), "{job}");
    assert_eq!(env.job_posts(&name), 1, "the job was launched once");
    let epochs: Vec<u64> = env
        .epochs(&backend, &id)
        .await
        .iter()
        .map(|(epoch, _)| *epoch)
        .collect();
    assert_eq!(epochs, [1, 2, 3]);
    let (_, page) = env
        .json(env.http.get(backend.at("/training/jobs?user_id=tier2")))
        .await;
    assert_eq!(page["total"], 1, "one job: {page}");
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_between_queueing_and_launching_runs_the_job_once_after_restart() {
    backend_killed_at("start-after-queue").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_between_recording_a_launch_and_making_it_runs_the_job_once_after_restart()
{
    backend_killed_at("dispatch-after-record").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_right_after_a_launch_runs_the_job_once_after_restart() {
    backend_killed_at("dispatch-after-launch").await;
}
