//! [`KubernetesLauncher`] (tiers 2 and 3): each job runs as a `batch/v1`
//! Job named `vtp-{job_id}`, whose pod runs the trainer image in one-shot
//! mode (`vtp-trainer-service run-job`, the request in `VTP_START_TRAINING`)
//! and reports over the same callback URL as every other tier.
//!
//! - Creating a Job that exists already adopts it: no second Job.
//! - Cancel deletes the Job with foreground propagation and the trainer's
//!   grace period, so the pod gets SIGTERM, saves `last` and reports
//!   `cancelled` before it is killed.
//! - [`KubernetesLauncher::reconcile`] (run every few seconds by the
//!   backend) maps Job and pod status back to the job store, so a job whose
//!   pod was evicted, could not pull its image, or whose Job vanished ends
//!   in a terminal state with the reason even when no callback arrives.
//!
//! - With a Kueue `LocalQueue` named (`VTP_K8S_KUEUE_QUEUE`), every job is
//!   handed over at once as a suspended Job labelled with the queue, and
//!   Kueue admits it when the cluster has room; a suspended Job is waiting,
//!   not lost. Without Kueue the backend's queue admits at most
//!   `VTP_MAX_RUNNING` Jobs at a time.
//! - The pod is hardened: a non-root user, a read-only root filesystem
//!   with `emptyDir` work and temporary directories, every capability
//!   dropped, no privilege escalation, the `RuntimeDefault` seccomp
//!   profile; ephemeral storage requested and limited from the dataset's
//!   size, which the trainer is told as the most its archive may unpack
//!   to.
//!
//! - A run across machines (`config.distributed.nnodes` = M > 1, a
//!   `python` job on `torchrun`) is an Indexed Job of M pods, one per
//!   machine, each requesting the job's `config.resources` (its GPUs too).
//!   Its pods share a headless Service (`vtp-{job_id}-{attempt}`, owned by
//!   the Job), so pod 0 is reached as `vtp-{job_id}-0.vtp-{job_id}-{attempt}`:
//!   every pod's trainer runs `torchrun --node-rank` from its completion
//!   index against that address (PyTorch's static rendezvous), and only
//!   pod 0 reports. The trainers' NetworkPolicy lets nothing reach a
//!   trainer pod; a NetworkPolicy of the attempt's own (owned by the Job
//!   too) lets its pods, and only them, reach each other, as the ranks'
//!   collectives need. Any pod's failure fails the Job (and so the
//!   attempt); the relaunch resumes every pod from the last stored set.
//!
//! The start request (with the job's config) and the job's callback secret
//! reach the pod from the job's own Secret, never in the pod spec; S3
//! credentials from the operator's Secret (`envFrom`), never inline. Those
//! credentials are the trainers' (one key for every job's pod): S3-style
//! stores such as Garage scope a key to buckets, not to a job's prefix, so
//! per-job credentials are left to a store with scoped session credentials;
//! give trainers a key of their own, on their bucket only
//! (docs/tier3-production.md).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::batch::v1::{
    Job as K8sJob, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, Pod, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, Secret, SecretEnvSource, SecretKeySelector, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use vtp_core::{
    CancelOutcome, Error, JobId, JobStatus, JobStore, JobStoreExt, Resources, Result,
    StartTraining, TrainerLauncher, error_chain,
};

pub use vtp_core::launcher::{
    CALLBACK_SECRET_ENV, EXIT_NON_RETRYABLE, MASTER_ADDR_ENV, MASTER_PORT_ENV, RENDEZVOUS_PORT,
    START_TRAINING_ENV,
};

/// Label carrying the job id on Jobs and pods.
pub const JOB_ID_LABEL: &str = "vtp.dev/job-id";

/// Label carrying the attempt a Job runs (absent: the first).
pub const ATTEMPT_LABEL: &str = "vtp.dev/attempt";

/// Whether `job` carries the label of `job_id`: ours to adopt or replace.
fn labelled_for(job: &K8sJob, job_id: JobId) -> bool {
    job.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(JOB_ID_LABEL))
        .is_some_and(|id| *id == job_id.to_string())
}

/// The attempt a Job runs, from its [`ATTEMPT_LABEL`].
fn attempt_of(job: &K8sJob) -> i32 {
    job.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ATTEMPT_LABEL))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1)
}

/// The label that hands a Job to a Kueue `LocalQueue`.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";

/// The user and group the trainer image runs as (its Dockerfile's).
pub const TRAINER_UID: i64 = 10001;

/// Where the pod's writable work directory is mounted (`VTP_WORK_DIR`).
pub const WORK_DIR: &str = "/work";

/// Label selecting every Job this launcher manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=vtp";

/// The trainer container's name (the pod failure policy refers to it).
pub const CONTAINER: &str = "trainer";

/// Waiting reasons of a container that will not start without a change.
const STUCK_REASONS: [&str; 5] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Settings of the Kubernetes launcher (`VTP_K8S_*`).
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesConfig {
    /// Namespace of the Jobs (`VTP_K8S_NAMESPACE`, default `default`, or the
    /// pod's own namespace in-cluster).
    pub namespace: String,
    /// Trainer image (`VTP_K8S_IMAGE`).
    pub image: String,
    /// `imagePullPolicy` (`VTP_K8S_IMAGE_PULL_POLICY`), the cluster's default when unset.
    pub image_pull_policy: Option<String>,
    /// Images a `python` job may name as `config.image`
    /// (`VTP_K8S_SCRIPT_IMAGES`, comma-separated; none by default): images
    /// built from the trainer's, with more Python packages. Any other is
    /// refused when the job is created.
    pub script_images: Vec<String>,
    /// Service account of the trainer pods (`VTP_K8S_SERVICE_ACCOUNT`).
    pub service_account: Option<String>,
    /// Secret whose keys become the trainer's environment: the S3
    /// credentials `VTP_S3_ACCESS_KEY_ID`, `VTP_S3_SECRET_ACCESS_KEY`
    /// (`VTP_K8S_S3_SECRET`).
    pub s3_secret: Option<String>,
    /// Plain environment of the trainer: blob URL, S3 endpoint and region.
    pub env: Vec<(String, String)>,
    /// Pod retries before the Job fails (`VTP_K8S_BACKOFF_LIMIT`, default 0:
    /// a retry restarts training from scratch; the platform prefers to fail
    /// the job with the reason).
    pub backoff_limit: i32,
    /// Longest a Job may run (`VTP_K8S_ACTIVE_DEADLINE_SECS`, default 1 day).
    pub active_deadline: Duration,
    /// How long finished Jobs stay for inspection (`VTP_K8S_TTL_SECS`, 1 hour).
    pub ttl_after_finished: Duration,
    /// Time between SIGTERM and SIGKILL on cancel (`VTP_K8S_GRACE_SECS`, 30 s).
    pub grace_period: Duration,
    /// Requests and limits when a job's config names none.
    pub default_resources: Resources,
    /// The most one job may ask for (`VTP_K8S_MAX_CPU`, `VTP_K8S_MAX_MEMORY`,
    /// `VTP_K8S_MAX_GPU`; defaults 8 CPUs, 32Gi, 1 GPU): a job asking for
    /// more is refused when it is created.
    pub max_resources: MaxResources,
    /// How long a job may wait for its Job to appear, or to report after
    /// its Job ended, before the reconciler ends it (`VTP_K8S_SETTLE_SECS`, 60 s).
    pub settle_time: Duration,
    /// Jobs run at once without Kueue (`VTP_MAX_RUNNING`, default 8).
    pub max_running: u32,
    /// The Kueue `LocalQueue` that admits the Jobs (`VTP_K8S_KUEUE_QUEUE`);
    /// none: the backend's own slots.
    pub kueue_queue: Option<String>,
    /// How long a failed Job stays once the reconciler has recorded why
    /// (`VTP_K8S_FAILED_TTL_SECS`, 10 minutes): the reason is in the job.
    pub failed_ttl: Duration,
    /// The most ephemeral storage one trainer pod may have
    /// (`VTP_K8S_MAX_EPHEMERAL_STORAGE`, default 64Gi): a dataset needing
    /// more is refused at launch.
    pub max_ephemeral_storage: String,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            namespace: "default".into(),
            image: "vtp-trainer:latest".into(),
            image_pull_policy: None,
            script_images: Vec::new(),
            service_account: None,
            s3_secret: None,
            env: Vec::new(),
            backoff_limit: 0,
            active_deadline: Duration::from_secs(24 * 3600),
            ttl_after_finished: Duration::from_secs(3600),
            grace_period: Duration::from_secs(30),
            default_resources: Resources {
                cpu: Some("1".into()),
                memory: Some("2Gi".into()),
                gpu: None,
            },
            settle_time: Duration::from_secs(60),
            max_resources: MaxResources::default(),
            max_running: 8,
            kueue_queue: None,
            failed_ttl: Duration::from_secs(600),
            max_ephemeral_storage: "64Gi".into(),
        }
    }
}

/// Operator-set ceilings on what one job's `config.resources` may ask for,
/// as Kubernetes quantities (parsed by `kube_quantity`, which knows the
/// decimal and binary suffixes: `"500m"`, `"4Gi"`, `"2G"`).
#[derive(Debug, Clone, PartialEq)]
pub struct MaxResources {
    /// Largest CPU request (`VTP_K8S_MAX_CPU`, default `"8"`).
    pub cpu: String,
    /// Largest memory request (`VTP_K8S_MAX_MEMORY`, default `"32Gi"`).
    pub memory: String,
    /// Most GPUs (`VTP_K8S_MAX_GPU`, default 1).
    pub gpu: u32,
}

impl Default for MaxResources {
    fn default() -> Self {
        MaxResources {
            cpu: "8".into(),
            memory: "32Gi".into(),
            gpu: 1,
        }
    }
}

/// A positive, finite quantity as a number of base units (cores, bytes).
fn quantity_amount(field: &str, text: &str) -> Result<f64> {
    let invalid = |why: &str| Error::invalid(field, format!("{text:?} {why}"));
    // The parser reads the number as an f64: bound the text so a thousand
    // digits are refused here rather than rounded.
    if text.is_empty() || text.len() > 32 {
        return Err(invalid("is not a Kubernetes quantity"));
    }
    let parsed = kube_quantity::ParsedQuantity::try_from(text)
        .map_err(|e| invalid(&format!("is not a Kubernetes quantity ({e})")))?;
    match parsed.to_bytes_f64() {
        Some(amount) if amount.is_finite() && amount > 0.0 => Ok(amount),
        _ => Err(invalid("must be a positive quantity")),
    }
}

impl MaxResources {
    /// Checks the maxima themselves (at start-up, so a typo in
    /// `VTP_K8S_MAX_MEMORY` stops the backend rather than every job).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the variable.
    pub fn validate(&self) -> Result<()> {
        quantity_amount("VTP_K8S_MAX_CPU", &self.cpu)?;
        quantity_amount("VTP_K8S_MAX_MEMORY", &self.memory)?;
        Ok(())
    }

    /// Refuses `resources` that are malformed or ask for more than the
    /// maxima allow.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `config.resources.cpu`, `.memory` or `.gpu`.
    pub fn check(&self, resources: &Resources) -> Result<()> {
        let within = |field: &str, asked: &str, max: &str| -> Result<()> {
            let amount = quantity_amount(field, asked)?;
            if amount > quantity_amount(field, max)? {
                return Err(Error::invalid(
                    field,
                    format!("{asked:?} is more than this cluster allows one job ({max})"),
                ));
            }
            Ok(())
        };
        if let Some(cpu) = &resources.cpu {
            within("config.resources.cpu", cpu, &self.cpu)?;
        }
        if let Some(memory) = &resources.memory {
            within("config.resources.memory", memory, &self.memory)?;
        }
        if let Some(gpu) = resources.gpu
            && gpu > self.gpu
        {
            return Err(Error::invalid(
                "config.resources.gpu",
                format!(
                    "{gpu} is more than this cluster allows one job ({})",
                    self.gpu
                ),
            ));
        }
        Ok(())
    }
}

/// The Kubernetes launcher's settings as `vtp-backend` arguments, each with
/// its `VTP_K8S_*` variable (`#[command(flatten)]`), so `--help` lists them.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Kubernetes launcher (--launcher kubernetes)")]
pub struct K8sArgs {
    /// Namespace of the trainer Jobs; in a cluster, the backend pod's own
    /// namespace when unset, else `default`.
    #[arg(long = "k8s-namespace", env = "VTP_K8S_NAMESPACE")]
    pub namespace: Option<String>,
    /// Trainer image.
    #[arg(
        long = "k8s-image",
        env = "VTP_K8S_IMAGE",
        default_value = "vtp-trainer:latest"
    )]
    pub image: String,
    /// The trainer container's `imagePullPolicy`; the cluster's default when unset.
    #[arg(long = "k8s-image-pull-policy", env = "VTP_K8S_IMAGE_PULL_POLICY")]
    pub image_pull_policy: Option<String>,
    /// Images a `python` job may name as `config.image` (comma-separated):
    /// the trainer's image with more packages. None by default.
    #[arg(
        long = "k8s-script-images",
        env = "VTP_K8S_SCRIPT_IMAGES",
        value_delimiter = ','
    )]
    pub script_images: Vec<String>,
    /// Service account of the trainer pods.
    #[arg(long = "k8s-service-account", env = "VTP_K8S_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// Secret whose keys (`VTP_S3_ACCESS_KEY_ID`, `VTP_S3_SECRET_ACCESS_KEY`)
    /// become the trainer's S3 credentials (`envFrom`; never inline).
    #[arg(long = "k8s-s3-secret", env = "VTP_K8S_S3_SECRET")]
    pub s3_secret: Option<String>,
    /// Pod retries before a Job fails (0: a failed attempt is the backend's
    /// to relaunch, from its last checkpoint set).
    #[arg(
        long = "k8s-backoff-limit",
        env = "VTP_K8S_BACKOFF_LIMIT",
        default_value_t = 0
    )]
    pub backoff_limit: i32,
    /// Longest a Job may run, in seconds.
    #[arg(
        long = "k8s-active-deadline-secs",
        env = "VTP_K8S_ACTIVE_DEADLINE_SECS",
        default_value_t = 24 * 3600
    )]
    pub active_deadline_secs: u64,
    /// How long finished Jobs stay for inspection, in seconds.
    #[arg(
        long = "k8s-ttl-secs",
        env = "VTP_K8S_TTL_SECS",
        default_value_t = 3600
    )]
    pub ttl_secs: u64,
    /// Seconds between SIGTERM and SIGKILL when a job is cancelled.
    #[arg(
        long = "k8s-grace-secs",
        env = "VTP_K8S_GRACE_SECS",
        default_value_t = 30
    )]
    pub grace_secs: u64,
    /// How long a job may wait for its Job to appear, or to report after
    /// its Job ended, before the reconciler ends it, in seconds.
    #[arg(
        long = "k8s-settle-secs",
        env = "VTP_K8S_SETTLE_SECS",
        default_value_t = 60
    )]
    pub settle_secs: u64,
    /// The most CPU one job may ask for (a Kubernetes quantity).
    #[arg(long = "k8s-max-cpu", env = "VTP_K8S_MAX_CPU", default_value = "8")]
    pub max_cpu: String,
    /// The most memory one job may ask for (a Kubernetes quantity).
    #[arg(
        long = "k8s-max-memory",
        env = "VTP_K8S_MAX_MEMORY",
        default_value = "32Gi"
    )]
    pub max_memory: String,
    /// The most GPUs one job may ask for.
    #[arg(long = "k8s-max-gpu", env = "VTP_K8S_MAX_GPU", default_value_t = 1)]
    pub max_gpu: u32,
    /// The most ephemeral storage (disk) one trainer pod may have; its
    /// request and limit come from its dataset's size.
    #[arg(
        long = "k8s-max-ephemeral-storage",
        env = "VTP_K8S_MAX_EPHEMERAL_STORAGE",
        default_value = "64Gi"
    )]
    pub max_ephemeral_storage: String,
    /// A Kueue `LocalQueue` in the namespace: Jobs are created suspended
    /// with its label and Kueue admits them (the backend's own slots,
    /// `VTP_MAX_RUNNING`, apply without it).
    #[arg(long = "k8s-kueue-queue", env = "VTP_K8S_KUEUE_QUEUE")]
    pub kueue_queue: Option<String>,
    /// How long a failed Job stays, in seconds, once its failure is recorded.
    #[arg(
        long = "k8s-failed-ttl-secs",
        env = "VTP_K8S_FAILED_TTL_SECS",
        default_value_t = 600
    )]
    pub failed_ttl_secs: u64,
}

impl K8sArgs {
    /// The launcher's settings; `trainer_env` is the trainer pods' plain
    /// environment (the blob URL, the S3 endpoint and region: never
    /// credentials).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the variable of a maximum that does
    /// not parse or is below a job's default resources.
    pub fn config(&self, trainer_env: Vec<(String, String)>) -> Result<KubernetesConfig> {
        let defaults = KubernetesConfig::default();
        let namespace = self
            .namespace
            .clone()
            .or_else(|| {
                std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                    .ok()
                    .map(|s| s.trim().to_owned())
            })
            .unwrap_or(defaults.namespace);
        let max = MaxResources {
            cpu: self.max_cpu.clone(),
            memory: self.max_memory.clone(),
            gpu: self.max_gpu,
        };
        max.validate()?;
        quantity_amount("VTP_K8S_MAX_EPHEMERAL_STORAGE", &self.max_ephemeral_storage)?;
        if let Some(queue) = &self.kueue_queue {
            vtp_core::validate_name("VTP_K8S_KUEUE_QUEUE", queue)?;
        }
        max.check(&defaults.default_resources).map_err(|e| {
            Error::invalid(
                "VTP_K8S_MAX_CPU / VTP_K8S_MAX_MEMORY / VTP_K8S_MAX_GPU",
                format!("below the default resources of a job: {e}"),
            )
        })?;
        Ok(KubernetesConfig {
            namespace,
            image: self.image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            script_images: self
                .script_images
                .iter()
                .map(|image| image.trim().to_owned())
                .filter(|image| !image.is_empty())
                .collect(),
            service_account: self.service_account.clone(),
            s3_secret: self.s3_secret.clone(),
            env: trainer_env,
            backoff_limit: self.backoff_limit,
            active_deadline: Duration::from_secs(self.active_deadline_secs),
            ttl_after_finished: Duration::from_secs(self.ttl_secs),
            grace_period: Duration::from_secs(self.grace_secs),
            default_resources: defaults.default_resources,
            settle_time: Duration::from_secs(self.settle_secs),
            max_resources: max,
            max_running: defaults.max_running,
            kueue_queue: self.kueue_queue.clone(),
            failed_ttl: Duration::from_secs(self.failed_ttl_secs),
            max_ephemeral_storage: self.max_ephemeral_storage.clone(),
        })
    }
}

/// What one [`KubernetesLauncher::reconcile`] pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Active jobs whose Job is still running.
    pub running: usize,
    /// Jobs ended by this pass, with the reason.
    pub ended: Vec<(JobId, String)>,
    /// Jobs whose still-running Kubernetes Job this pass deleted because the
    /// job itself is over (Jobs of ids this store does not know are left).
    pub deleted: Vec<JobId>,
}

/// Whether a Kubernetes Job has finished (complete or failed).
fn job_finished(k8s: &K8sJob) -> bool {
    k8s.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions.iter().any(|c| {
                c.status == "True"
                    && matches!(
                        c.type_.as_str(),
                        "Complete" | "Failed" | "FailureTarget" | "SuccessCriteriaMet"
                    )
            })
        })
}

/// Runs trainers as Kubernetes Jobs.
#[derive(Clone)]
pub struct KubernetesLauncher {
    jobs_api: Api<K8sJob>,
    pods_api: Api<Pod>,
    secrets_api: Api<Secret>,
    services_api: Api<Service>,
    policies_api: Api<NetworkPolicy>,
    config: KubernetesConfig,
    store: Arc<dyn JobStore>,
    /// The jobs whose Job was suspended (not yet admitted by Kueue) at the
    /// last reconcile pass, and when that was.
    suspended:
        Arc<std::sync::Mutex<(std::collections::HashSet<JobId>, Option<std::time::Instant>)>>,
}

impl std::fmt::Debug for KubernetesLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesLauncher")
            .field("namespace", &self.config.namespace)
            .field("image", &self.config.image)
            .finish()
    }
}

/// Makes aws-lc-rs (the one crypto provider of every VTP TLS client)
/// rustls's process-wide provider, unless one is set, so the kube client
/// never has to guess. Call before building a `kube::Client`.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The Job name of a job.
pub fn job_name(job_id: JobId) -> String {
    format!("vtp-{job_id}")
}

/// The name of the headless Service of an attempt at a run across
/// machines: one per attempt, owned by its Job, so a relaunch never finds
/// the one an earlier attempt's Job is taking away with it.
pub fn service_name(job_id: JobId, attempt: i32) -> String {
    format!("{}-{attempt}", job_name(job_id))
}

/// The name of the Secret holding a job's start request and callback
/// secret.
pub fn secret_name(job_id: JobId) -> String {
    format!("vtp-{job_id}-callback")
}

/// The ephemeral storage of a trainer pod for a dataset archive of
/// `dataset_bytes` (1 GiB when unknown), and how much of it the archive
/// may unpack to: the archive, twice its size unpacked (at least 1 GiB),
/// and 2 GiB for checkpoints and the work directory.
pub fn storage_for(dataset_bytes: Option<u64>) -> (u64, u64) {
    const GIB: u64 = 1 << 30;
    let archive = dataset_bytes.unwrap_or(GIB);
    let unpacked = archive.saturating_mul(2).max(GIB);
    let total = archive.saturating_add(unpacked).saturating_add(2 * GIB);
    // Whole mebibytes, rounded up.
    (total.div_ceil(1 << 20) << 20, unpacked)
}

/// A kube error in the platform's categories.
fn from_kube(error: kube::Error) -> Error {
    match error {
        kube::Error::Api(status) => {
            let message = format!("kubernetes: {} ({})", status.message, status.reason);
            match status.code {
                404 => Error::NotFound {
                    kind: "kubernetes object",
                    id: status.message.clone(),
                },
                409 => Error::conflict(message),
                400 | 422 => Error::invalid("kubernetes", message),
                429 | 500..=599 => Error::Unavailable {
                    service: "kubernetes",
                    source: message.into(),
                },
                _ => Error::Backend {
                    service: "kubernetes",
                    source: message.into(),
                },
            }
        }
        other => Error::Unavailable {
            service: "kubernetes",
            source: Box::new(other),
        },
    }
}

impl KubernetesLauncher {
    /// Objects read per page from the store and the API server.
    pub const PAGE: u32 = 500;

    /// A launcher over `client`, ending jobs in `store` that the reconciler
    /// finds lost.
    pub fn new(client: kube::Client, config: KubernetesConfig, store: Arc<dyn JobStore>) -> Self {
        KubernetesLauncher {
            jobs_api: Api::namespaced(client.clone(), &config.namespace),
            pods_api: Api::namespaced(client.clone(), &config.namespace),
            secrets_api: Api::namespaced(client.clone(), &config.namespace),
            services_api: Api::namespaced(client.clone(), &config.namespace),
            policies_api: Api::namespaced(client, &config.namespace),
            config,
            store,
            suspended: Arc::default(),
        }
    }

    /// A launcher with `config` on the cluster of the environment:
    /// in-cluster service account, else `KUBECONFIG` / `~/.kube/config`.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when no cluster configuration is found.
    pub async fn connect(config: KubernetesConfig, store: Arc<dyn JobStore>) -> Result<Self> {
        install_crypto_provider();
        let client = kube::Client::try_default()
            .await
            .map_err(|e| Error::Unavailable {
                service: "kubernetes",
                source: Box::new(e),
            })?;
        Ok(KubernetesLauncher::new(client, config, store))
    }

    /// The launcher's settings.
    pub fn config(&self) -> &KubernetesConfig {
        &self.config
    }

    /// What a job with `config` gets: each of `config.resources`' fields,
    /// or the default for those it leaves out (so leaving one out never
    /// means "unlimited"), checked against the maxima. Checked at launch
    /// too, not only at create: the maxima may have been lowered since.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn resources_of(&self, config: &serde_json::Value) -> Result<Resources> {
        let defaults = &self.config.default_resources;
        let resources = match Resources::from_config(config)? {
            None => defaults.clone(),
            Some(asked) => Resources {
                cpu: asked.cpu.or_else(|| defaults.cpu.clone()),
                memory: asked.memory.or_else(|| defaults.memory.clone()),
                gpu: asked.gpu.or(defaults.gpu),
            },
        };
        self.config.max_resources.check(&resources)?;
        Ok(resources)
    }

    /// The image a job with `config` runs: its `config.image` (a `python`
    /// job's) when the operator allow-lists it, else the trainer's.
    /// Checked at launch too: the list may have shrunk since.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] on `config.image`.
    pub fn image_of(&self, config: &serde_json::Value) -> Result<String> {
        let Some(asked) = config.get("image") else {
            return Ok(self.config.image.clone());
        };
        match asked.as_str() {
            Some(image) if self.config.script_images.iter().any(|ok| ok == image) => {
                Ok(image.to_owned())
            }
            _ if self.config.script_images.is_empty() => Err(Error::invalid(
                "config.image",
                "no image is allow-listed here (VTP_K8S_SCRIPT_IMAGES): scripts run in the trainer's own",
            )),
            _ => Err(Error::invalid(
                "config.image",
                format!(
                    "{asked} is not allow-listed; this platform runs scripts in {}",
                    self.config.script_images.join(", ")
                ),
            )),
        }
    }

    /// The machines a job runs on: its `config.distributed.nnodes` (a
    /// `python` job's), else 1.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] beyond [`vtp_core::Distributed::MAX_NNODES`].
    fn nnodes_of(&self, request: &StartTraining) -> Result<i32> {
        let nnodes = vtp_core::Distributed::nnodes_of(&request.config);
        if nnodes > u64::from(vtp_core::Distributed::MAX_NNODES) {
            return Err(Error::invalid(
                "config.distributed.nnodes",
                format!("must be from 1 to {}", vtp_core::Distributed::MAX_NNODES),
            ));
        }
        Ok(nnodes.max(1) as i32)
    }

    /// What a run across machines needs beside its Job `job`, both owned
    /// by it (so they go with it), both named [`service_name`]: the
    /// headless Service through which its pods find pod 0, and the
    /// NetworkPolicy that lets its pods, and no others, reach each other
    /// (the rendezvous, then the collectives' connections on any port).
    /// `None` for a job on one machine.
    ///
    /// # Errors
    /// As [`Self::job_manifest`].
    pub fn peer_objects(
        &self,
        request: &StartTraining,
        job: &K8sJob,
    ) -> Result<Option<(Service, NetworkPolicy)>> {
        if self.nnodes_of(request)? == 1 {
            return Ok(None);
        }
        // This attempt's pods: the Job's, not an earlier attempt's.
        let pods = BTreeMap::from([
            (JOB_ID_LABEL.to_owned(), request.job_id.to_string()),
            (ATTEMPT_LABEL.to_owned(), request.attempt.to_string()),
        ]);
        let mut labels = pods.clone();
        labels.insert("app.kubernetes.io/managed-by".to_owned(), "vtp".to_owned());
        let metadata = ObjectMeta {
            name: Some(service_name(request.job_id, request.attempt)),
            namespace: Some(self.config.namespace.clone()),
            labels: Some(labels),
            owner_references: job.metadata.uid.clone().map(|uid| {
                vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                        api_version: "batch/v1".to_owned(),
                        kind: "Job".to_owned(),
                        name: job_name(request.job_id),
                        uid,
                        ..Default::default()
                    },
                ]
            }),
            ..ObjectMeta::default()
        };
        let service = Service {
            metadata: metadata.clone(),
            spec: Some(ServiceSpec {
                // Headless: a DNS name per pod, no virtual IP.
                cluster_ip: Some("None".to_owned()),
                selector: Some(pods.clone()),
                // Pods resolve each other while they start, before any is ready.
                publish_not_ready_addresses: Some(true),
                ports: Some(vec![ServicePort {
                    name: Some("rendezvous".to_owned()),
                    port: i32::from(RENDEZVOUS_PORT),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        };
        let peers = || {
            Some(vec![NetworkPolicyPeer {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(pods.clone()),
                    ..LabelSelector::default()
                }),
                ..NetworkPolicyPeer::default()
            }])
        };
        let policy = NetworkPolicy {
            metadata,
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(pods.clone()),
                    ..LabelSelector::default()
                }),
                policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: peers(),
                    ports: None,
                }]),
                egress: Some(vec![NetworkPolicyEgressRule {
                    to: peers(),
                    ports: None,
                }]),
            }),
        };
        Ok(Some((service, policy)))
    }

    /// Creates what `request`'s Job `job` needs beside it
    /// ([`Self::peer_objects`]), if anything; what exists already (a
    /// retried launch) is kept.
    async fn put_peer_objects(&self, request: &StartTraining, job: &K8sJob) -> Result<()> {
        let Some((service, policy)) = self.peer_objects(request, job)? else {
            return Ok(());
        };
        let kept = |created: std::result::Result<(), kube::Error>| match created {
            Ok(()) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(from_kube(e)),
        };
        kept(
            self.policies_api
                .create(&PostParams::default(), &policy)
                .await
                .map(drop),
        )?;
        kept(
            self.services_api
                .create(&PostParams::default(), &service)
                .await
                .map(drop),
        )
    }

    /// The Job that runs `request`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a malformed `config.resources` or one
    /// beyond [`KubernetesConfig::max_resources`].
    pub fn job_manifest(&self, request: &StartTraining) -> Result<K8sJob> {
        let c = &self.config;
        let name = job_name(request.job_id);
        let labels = BTreeMap::from([
            (
                "app.kubernetes.io/name".to_owned(),
                "vtp-trainer".to_owned(),
            ),
            ("app.kubernetes.io/managed-by".to_owned(), "vtp".to_owned()),
            (JOB_ID_LABEL.to_owned(), request.job_id.to_string()),
            (ATTEMPT_LABEL.to_owned(), request.attempt.to_string()),
        ]);
        let resources = self.resources_of(&request.config)?;
        let mut quantities = BTreeMap::new();
        if let Some(cpu) = &resources.cpu {
            quantities.insert("cpu".to_owned(), Quantity(cpu.clone()));
        }
        if let Some(memory) = &resources.memory {
            quantities.insert("memory".to_owned(), Quantity(memory.clone()));
        }
        if let Some(gpu) = resources.gpu.filter(|g| *g > 0) {
            quantities.insert("nvidia.com/gpu".to_owned(), Quantity(gpu.to_string()));
        }
        let (storage, unpacked) = storage_for(request.dataset_bytes);
        let max_storage =
            quantity_amount("VTP_K8S_MAX_EPHEMERAL_STORAGE", &c.max_ephemeral_storage)?;
        if storage as f64 > max_storage {
            return Err(Error::invalid(
                "dataset_s3_uri",
                format!(
                    "the dataset needs {}Mi of disk to unpack and train; a trainer pod may have at most {}",
                    storage >> 20,
                    c.max_ephemeral_storage
                ),
            ));
        }
        let storage = Quantity(format!("{}Mi", storage >> 20));
        quantities.insert("ephemeral-storage".to_owned(), storage.clone());
        // Neither the start request (the job's config, up to the backend's
        // limit) nor the callback secret is in the pod spec: both come
        // from the job's own Secret ([`Self::put_secret`]).
        let mut env: Vec<EnvVar> = c
            .env
            .iter()
            .map(|(name, value)| EnvVar {
                name: name.clone(),
                value: Some(value.clone()),
                ..EnvVar::default()
            })
            .collect();
        let from_secret = |key: &str| EnvVar {
            name: key.to_owned(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret_name(request.job_id),
                    key: key.to_owned(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        };
        env.push(from_secret(START_TRAINING_ENV));
        for (name, value) in [
            ("VTP_WORK_DIR", WORK_DIR.to_owned()),
            ("VTP_MAX_UNPACKED_BYTES", unpacked.to_string()),
            ("TMPDIR", "/tmp".to_owned()),
        ] {
            env.push(EnvVar {
                name: name.to_owned(),
                value: Some(value),
                ..EnvVar::default()
            });
        }
        // The one-shot trainer reports only to this origin; the request in
        // the pod spec is the backend's own, so its callback URL is the one.
        if let Ok(callback) = url::Url::parse(&request.callback_url) {
            env.push(EnvVar {
                name: "VTP_BACKEND_URL".to_owned(),
                value: Some(callback.origin().ascii_serialization()),
                ..EnvVar::default()
            });
        }
        if request.callback_secret.is_some() {
            env.push(from_secret(CALLBACK_SECRET_ENV));
        }
        // A run across machines: pod 0 under the attempt's headless Service
        // hosts the rendezvous (each pod's rank is its completion index,
        // `JOB_COMPLETION_INDEX`, which Kubernetes sets).
        let nnodes = self.nnodes_of(request)?;
        let service = service_name(request.job_id, request.attempt);
        if nnodes > 1 {
            for (name, value) in [
                (MASTER_ADDR_ENV, format!("{name}-0.{service}")),
                (MASTER_PORT_ENV, RENDEZVOUS_PORT.to_string()),
            ] {
                env.push(EnvVar {
                    name: name.to_owned(),
                    value: Some(value),
                    ..EnvVar::default()
                });
            }
        }
        let container = Container {
            name: CONTAINER.to_owned(),
            image: Some(self.image_of(&request.config)?),
            image_pull_policy: c.image_pull_policy.clone(),
            args: Some(vec!["run-job".to_owned()]),
            env: Some(env),
            ports: (nnodes > 1).then(|| {
                vec![ContainerPort {
                    name: Some("rendezvous".to_owned()),
                    container_port: i32::from(RENDEZVOUS_PORT),
                    ..ContainerPort::default()
                }]
            }),
            env_from: c.s3_secret.as_ref().map(|secret| {
                vec![EnvFromSource {
                    secret_ref: Some(SecretEnvSource {
                        name: secret.clone(),
                        optional: Some(false),
                    }),
                    ..EnvFromSource::default()
                }]
            }),
            resources: Some(ResourceRequirements {
                // Requests equal limits: the pod is Guaranteed, and GPUs must match.
                requests: Some(quantities.clone()),
                limits: Some(quantities),
                ..ResourceRequirements::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".to_owned()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "work".to_owned(),
                    mount_path: WORK_DIR.to_owned(),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "tmp".to_owned(),
                    mount_path: "/tmp".to_owned(),
                    ..VolumeMount::default()
                },
            ]),
            ..Container::default()
        };
        let volumes = vec![
            Volume {
                name: "work".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(storage),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "tmp".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity("1Gi".to_owned())),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            },
        ];
        let mut job_labels = labels.clone();
        if let Some(queue) = &c.kueue_queue {
            job_labels.insert(KUEUE_QUEUE_LABEL.to_owned(), queue.clone());
        }
        Ok(K8sJob {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(c.namespace.clone()),
                labels: Some(job_labels),
                ..ObjectMeta::default()
            },
            spec: Some(JobSpec {
                // Kueue unsuspends the Job when it admits it.
                suspend: c.kueue_queue.as_ref().map(|_| true),
                // One pod per machine, each knowing its rank by its index.
                completion_mode: (nnodes > 1).then(|| "Indexed".to_owned()),
                completions: (nnodes > 1).then_some(nnodes),
                parallelism: (nnodes > 1).then_some(nnodes),
                backoff_limit: Some(c.backoff_limit),
                active_deadline_seconds: Some(c.active_deadline.as_secs() as i64),
                ttl_seconds_after_finished: Some(c.ttl_after_finished.as_secs() as i32),
                pod_failure_policy: Some(PodFailurePolicy {
                    rules: vec![
                        // An evicted, preempted or drained pod is replaced
                        // without using up a retry; the replacement resumes
                        // from the newest stored checkpoint set.
                        PodFailurePolicyRule {
                            action: "Ignore".to_owned(),
                            on_exit_codes: None,
                            on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                                type_: "DisruptionTarget".to_owned(),
                                status: "True".to_owned(),
                            }]),
                        },
                        PodFailurePolicyRule {
                            action: "FailJob".to_owned(),
                            on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                                container_name: Some(CONTAINER.to_owned()),
                                operator: "In".to_owned(),
                                values: vec![EXIT_NON_RETRYABLE],
                            }),
                            on_pod_conditions: None,
                        },
                    ],
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        // Required by podFailurePolicy; the Job retries pods.
                        restart_policy: Some("Never".to_owned()),
                        // `{job}-{index}.{service}` names each pod.
                        subdomain: (nnodes > 1).then_some(service),
                        service_account_name: c.service_account.clone(),
                        termination_grace_period_seconds: Some(c.grace_period.as_secs() as i64),
                        containers: vec![container],
                        volumes: Some(volumes),
                        // The trainer talks to the backend and S3, not the
                        // Kubernetes API.
                        automount_service_account_token: Some(false),
                        security_context: Some(PodSecurityContext {
                            run_as_non_root: Some(true),
                            run_as_user: Some(TRAINER_UID),
                            run_as_group: Some(TRAINER_UID),
                            fs_group: Some(TRAINER_UID),
                            seccomp_profile: Some(SeccompProfile {
                                type_: "RuntimeDefault".to_owned(),
                                ..SeccompProfile::default()
                            }),
                            ..PodSecurityContext::default()
                        }),
                        ..PodSpec::default()
                    }),
                },
                ..JobSpec::default()
            }),
            status: None,
        })
    }

    /// One reconcile pass: every active job (queued, running, cancelling)
    /// is checked against its Job and pods, and ended with the reason when
    /// its Job failed, vanished, finished without a report, or its pod cannot
    /// start.
    ///
    /// # Errors
    /// Store or Kubernetes errors; the pass is simply tried again later.
    pub async fn reconcile_pass(&self) -> Result<Reconciled> {
        // Both listings are paged: the store's by keyset, the API server's
        // by its continue token.
        let mut active = Vec::new();
        for mut pages in vtp_core::JobPages::launched(self.store.as_ref(), Self::PAGE) {
            while let Some(page) = pages.next().await? {
                active.extend(page);
            }
        }
        let mut by_id: HashMap<String, K8sJob> = HashMap::new();
        let mut params = ListParams::default()
            .labels(MANAGED_SELECTOR)
            .limit(Self::PAGE);
        loop {
            let listed = self.jobs_api.list(&params).await.map_err(from_kube)?;
            let next = listed.metadata.continue_.clone().filter(|t| !t.is_empty());
            by_id.extend(listed.items.into_iter().filter_map(|job| {
                let id = job.metadata.labels.as_ref()?.get(JOB_ID_LABEL)?.clone();
                Some((id, job))
            }));
            match next {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        let suspended = by_id
            .iter()
            .filter(|(_, job)| job.spec.as_ref().and_then(|spec| spec.suspend) == Some(true))
            .filter_map(|(id, _)| id.parse::<JobId>().ok())
            .collect();
        *self
            .suspended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            (suspended, Some(std::time::Instant::now()));
        let now = chrono::Utc::now();
        let settled = |since: chrono::DateTime<chrono::Utc>| {
            (now - since).to_std().unwrap_or_default() >= self.config.settle_time
        };
        let mut report = Reconciled::default();
        // A Job still running for a job that is over (failed by the sweeper,
        // cancelled, or gone from the store) is an orphan burning a node:
        // delete it. Finished Jobs are left to their TTL, for inspection.
        let active_ids: std::collections::HashSet<String> =
            active.iter().map(|job| job.id.to_string()).collect();
        for (id, k8s) in &by_id {
            if active_ids.contains(id) || job_finished(k8s) {
                continue;
            }
            let Ok(job_id) = id.parse::<JobId>() else {
                continue;
            };
            // A Job whose job this store does not know may be another
            // installation's in a shared namespace: not ours to delete.
            let over = match self.store.get(job_id).await {
                Ok(job) => job.status.is_terminal().then_some(job.status),
                Err(Error::NotFound { .. }) => None,
                Err(e) => return Err(e),
            };
            if let Some(status) = over {
                let name = job_name(job_id);
                tracing::warn!(%job_id, %status, job = %name, "reconcile: deleting the Job of a job that is over");
                match self.delete(&name, self.config.grace_period).await {
                    Ok(_) => report.deleted.push(job_id),
                    Err(e) => {
                        tracing::warn!(%job_id, error = %error_chain(&e), "could not delete the Job; next pass");
                    }
                }
            }
        }
        for job in active {
            let verdict = match by_id.get(&job.id.to_string()) {
                // The Job of an attempt the job has moved past: the
                // relauncher replaces it with the current attempt's. One
                // still running (its trainer went silent, and the sweeper's
                // delete failed) is deleted now.
                Some(k8s) if attempt_of(k8s) < job.attempt => {
                    if !job_finished(k8s) {
                        let name = job_name(job.id);
                        tracing::warn!(job_id = %job.id, job = %name, "reconcile: deleting the running Job of an attempt given up on");
                        if let Err(e) = self
                            .jobs_api
                            .delete(&name, &DeleteParams::background())
                            .await
                        {
                            tracing::warn!(job_id = %job.id, error = %from_kube(e), "could not delete the Job; next pass");
                        }
                    }
                    continue;
                }
                // Being cancelled, and its Job is gone (the cancel deleted
                // it): nothing more will report; cancelled now.
                None if job.status == JobStatus::Cancelling => Some((
                    format!("its Kubernetes Job {} was deleted", job_name(job.id)),
                    false,
                )),
                // Deleted by someone, or gone with its TTL before the job
                // heard of its end: worth another attempt.
                None if settled(job.updated_at) => Some((
                    format!("its Kubernetes Job {} vanished", job_name(job.id)),
                    true,
                )),
                None => None,
                Some(k8s) => self.verdict(k8s, job.updated_at, &settled).await?,
            };
            match verdict {
                Some((reason, retry)) => {
                    tracing::warn!(job_id = %job.id, %reason, retry, "reconcile: ending the attempt");
                    if by_id.contains_key(&job.id.to_string()) {
                        // Its failure is recorded now: the Job need not stay long.
                        self.shorten_ttl(&job_name(job.id)).await;
                    }
                    if retry && job.status != JobStatus::Cancelling {
                        // Relaunched (resuming from its last checkpoint set)
                        // while attempts are left, else failed.
                        self.store.end_attempt(job.id, job.attempt, &reason).await?;
                    } else {
                        self.store.finalize_lost(job.id, &reason).await?;
                        if let Err(e) = self.delete_secret(job.id).await {
                            tracing::warn!(job_id = %job.id, error = %error_chain(&e), "could not delete the callback Secret");
                        }
                    }
                    report.ended.push((job.id, reason));
                }
                None => report.running += 1,
            }
        }
        Ok(report)
    }

    /// Why the job behind `k8s` is over, and whether another attempt may
    /// succeed (its pods crashed, not a deadline or a refusal); `None` while
    /// it runs.
    async fn verdict(
        &self,
        k8s: &K8sJob,
        updated_at: chrono::DateTime<chrono::Utc>,
        settled: &impl Fn(chrono::DateTime<chrono::Utc>) -> bool,
    ) -> Result<Option<(String, bool)>> {
        let name = k8s.metadata.name.clone().unwrap_or_default();
        let conditions = k8s
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        // `FailureTarget` and `SuccessCriteriaMet` come first on newer clusters.
        let holds = |kinds: [&str; 2]| {
            conditions
                .iter()
                .find(|c| kinds.contains(&c.type_.as_str()) && c.status == "True")
        };
        if let Some(failed) = holds(["Failed", "FailureTarget"]) {
            let pods = self.pod_reasons(&name).await?;
            let mut reason = format!(
                "Kubernetes Job {name} failed: {}",
                failed
                    .reason
                    .clone()
                    .unwrap_or_else(|| "no reason given".into())
            );
            if let Some(message) = failed.message.as_ref().filter(|m| !m.is_empty()) {
                reason.push_str(&format!(" ({message})"));
            }
            if !pods.is_empty() {
                reason.push_str(&format!("; {}", pods.join("; ")));
            }
            // Out of pod retries (a crash, an OOM kill): the next attempt
            // resumes from the last set. A deadline or a trainer that
            // refused the job (exit 3) is final.
            let retry = failed.reason.as_deref() == Some("BackoffLimitExceeded");
            return Ok(Some((reason, retry)));
        }
        if let Some(done) = holds(["Complete", "SuccessCriteriaMet"]) {
            let since = done
                .last_transition_time
                .as_ref()
                .and_then(|t| {
                    chrono::DateTime::from_timestamp(
                        t.0.as_second(),
                        t.0.subsec_nanosecond() as u32,
                    )
                })
                .unwrap_or(updated_at);
            return Ok(settled(since).then(|| {
                (
                    format!(
                        "Kubernetes Job {name} completed, but its trainer's final report never arrived"
                    ),
                    false,
                )
            }));
        }
        // Still active: a pod that cannot start never will on its own.
        let stuck = self.stuck_pods(&name).await?;
        if !stuck.is_empty() {
            self.delete(&name, Duration::ZERO).await?;
            return Ok(Some((
                format!(
                    "the trainer pod of {name} cannot start: {}",
                    stuck.join("; ")
                ),
                false,
            )));
        }
        Ok(None)
    }

    /// Gives a finished Job whose end is recorded the short TTL of failed
    /// Jobs (`ttlSecondsAfterFinished` may change after creation).
    async fn shorten_ttl(&self, name: &str) {
        let ttl = self.config.failed_ttl.as_secs() as i64;
        let patch = serde_json::json!({"spec": {"ttlSecondsAfterFinished": ttl}});
        if let Err(e) = self
            .jobs_api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::debug!(job = %name, error = %from_kube(e), "could not shorten the TTL of a failed Job");
        }
    }

    async fn pods_of(&self, name: &str) -> Result<Vec<Pod>> {
        Ok(self
            .pods_api
            .list(&ListParams::default().labels(&format!("job-name={name}")))
            .await
            .map_err(from_kube)?
            .items)
    }

    /// Why the Job's pods failed: eviction, OOM, exit codes.
    async fn pod_reasons(&self, name: &str) -> Result<Vec<String>> {
        let mut reasons = Vec::new();
        for pod in self.pods_of(name).await? {
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let Some(status) = pod.status else { continue };
            if let Some(reason) = status.reason.as_ref().filter(|r| !r.is_empty()) {
                let message = status.message.clone().unwrap_or_default();
                reasons.push(
                    format!("pod {pod_name} {reason}: {message}")
                        .trim_end_matches(": ")
                        .to_owned(),
                );
            }
            for container in status.container_statuses.unwrap_or_default() {
                let terminated = container
                    .state
                    .as_ref()
                    .and_then(|s| s.terminated.clone())
                    .or_else(|| {
                        container
                            .last_state
                            .as_ref()
                            .and_then(|s| s.terminated.clone())
                    });
                if let Some(t) = terminated.filter(|t| t.exit_code != 0) {
                    reasons.push(format!(
                        "pod {pod_name} container {} exited with code {}{}",
                        container.name,
                        t.exit_code,
                        t.reason.map(|r| format!(" ({r})")).unwrap_or_default()
                    ));
                }
            }
        }
        Ok(reasons)
    }

    /// Containers waiting for something that will not change by itself.
    async fn stuck_pods(&self, name: &str) -> Result<Vec<String>> {
        let mut stuck = Vec::new();
        for pod in self.pods_of(name).await? {
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let statuses = pod
                .status
                .and_then(|s| s.container_statuses)
                .unwrap_or_default();
            for container in statuses {
                let Some(waiting) = container.state.and_then(|s| s.waiting) else {
                    continue;
                };
                let reason = waiting.reason.unwrap_or_default();
                if STUCK_REASONS.contains(&reason.as_str()) {
                    stuck.push(format!(
                        "pod {pod_name} {reason}: {}",
                        waiting.message.unwrap_or_default()
                    ));
                }
            }
        }
        Ok(stuck)
    }

    /// Stores the job's start request (without its callback secret) and
    /// its callback secret in its own Secret (replacing one an earlier
    /// launch made), labelled like the Job.
    async fn put_secret(&self, request: &StartTraining) -> Result<()> {
        let mut public = request.clone();
        let secret = public.callback_secret.take();
        let request_json =
            serde_json::to_string(&public).map_err(|e| Error::internal(e.to_string()))?;
        let mut data = BTreeMap::from([(START_TRAINING_ENV.to_owned(), request_json)]);
        if let Some(secret) = &secret {
            data.insert(CALLBACK_SECRET_ENV.to_owned(), secret.expose().to_owned());
        }
        let name = secret_name(request.job_id);
        let object = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.config.namespace.clone()),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/managed-by".to_owned(), "vtp".to_owned()),
                    (JOB_ID_LABEL.to_owned(), request.job_id.to_string()),
                ])),
                ..ObjectMeta::default()
            },
            string_data: Some(data),
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        };
        match self
            .secrets_api
            .create(&PostParams::default(), &object)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let existing = self.secrets_api.get(&name).await.map_err(from_kube)?;
                let mut object = object;
                object.metadata.resource_version = existing.metadata.resource_version;
                self.secrets_api
                    .replace(&name, &PostParams::default(), &object)
                    .await
                    .map_err(from_kube)?;
                Ok(())
            }
            Err(e) => Err(from_kube(e)),
        }
    }

    /// Makes the Job the owner of its callback Secret, so Kubernetes deletes
    /// the Secret with the Job (its TTL, a cancel, the reconciler).
    async fn own_secret(&self, job_id: JobId, job: &K8sJob) -> Result<()> {
        let Some(uid) = job.metadata.uid.clone() else {
            return Ok(());
        };
        let name = secret_name(job_id);
        let mut secret = match self.secrets_api.get(&name).await {
            Ok(secret) => secret,
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
            Err(e) => return Err(from_kube(e)),
        };
        secret.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "batch/v1".to_owned(),
                kind: "Job".to_owned(),
                name: job_name(job_id),
                uid,
                ..Default::default()
            },
        ]);
        self.secrets_api
            .replace(&name, &PostParams::default(), &secret)
            .await
            .map_err(from_kube)?;
        Ok(())
    }

    /// Deletes the job's callback Secret; a missing one is fine.
    async fn delete_secret(&self, job_id: JobId) -> Result<()> {
        match self
            .secrets_api
            .delete(&secret_name(job_id), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(from_kube(e)),
        }
    }

    /// Removes the Job of an earlier attempt of `job_id` (finished, or
    /// still running because its trainer went silent), so the relaunch can
    /// create its own under the same name; waits (briefly) until it is gone.
    /// `false` when the Job runs this attempt (adopt it) or is not ours. Its
    /// callback Secret stays: the relaunch has just replaced it, without the
    /// old Job as its owner.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the old Job is still being removed (the
    /// relauncher tries again); Kubernetes API errors.
    async fn remove_older(&self, job_id: JobId, attempt: i32) -> Result<bool> {
        let name = job_name(job_id);
        let Some(existing) = self.jobs_api.get_opt(&name).await.map_err(from_kube)? else {
            return Ok(true);
        };
        if !labelled_for(&existing, job_id) || attempt_of(&existing) >= attempt {
            return Ok(false);
        }
        tracing::info!(%job_id, job = %name, old = attempt_of(&existing), new = attempt, "removing the Job of an earlier attempt");
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            grace_period_seconds: Some(self.config.grace_period.as_secs() as u32),
            ..DeleteParams::default()
        };
        match self.jobs_api.delete(&name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(true),
            Err(e) => return Err(from_kube(e)),
        }
        for _ in 0..20 {
            if self
                .jobs_api
                .get_opt(&name)
                .await
                .map_err(from_kube)?
                .is_none()
            {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(Error::unavailable(
            "kubernetes",
            format!("the Job {name} of an earlier attempt is still being removed"),
        ))
    }

    async fn delete(&self, name: &str, grace: Duration) -> Result<bool> {
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Foreground),
            grace_period_seconds: Some(grace.as_secs() as u32),
            ..DeleteParams::default()
        };
        if let Some(id) = name
            .strip_prefix("vtp-")
            .and_then(|id| id.parse::<JobId>().ok())
            && let Err(e) = self.delete_secret(id).await
        {
            tracing::warn!(job_id = %id, error = %error_chain(&e), "could not delete the callback Secret");
        }
        match self.jobs_api.delete(name, &params).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(e) => Err(from_kube(e)),
        }
    }
}

#[async_trait]
impl TrainerLauncher for KubernetesLauncher {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn check_config(&self, config: &serde_json::Value) -> Result<()> {
        self.image_of(config)?;
        self.resources_of(config).map(|_| ())
    }

    /// Kueue admits the Jobs when it names a queue; else `max_running`.
    async fn capacity(&self) -> Result<vtp_core::Capacity> {
        Ok(match self.config.kueue_queue {
            Some(_) => vtp_core::Capacity::Admitted,
            None => vtp_core::Capacity::Slots(self.config.max_running),
        })
    }

    /// Whether the job's Job is suspended (Kueue has not admitted it): as
    /// of the last reconcile pass when that was within a minute, else asked.
    async fn waiting_for_admission(&self, job_id: JobId) -> Result<bool> {
        if self.config.kueue_queue.is_none() {
            return Ok(false);
        }
        {
            let cached = self
                .suspended
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let (set, Some(at)) = &*cached
                && at.elapsed() < Duration::from_secs(60)
            {
                return Ok(set.contains(&job_id));
            }
        }
        let job = self
            .jobs_api
            .get_opt(&job_name(job_id))
            .await
            .map_err(from_kube)?;
        Ok(job.and_then(|job| job.spec).and_then(|spec| spec.suspend) == Some(true))
    }

    async fn reconcile(&self) -> Result<()> {
        let done = self.reconcile_pass().await?;
        if !done.ended.is_empty() {
            tracing::info!(
                ended = done.ended.len(),
                running = done.running,
                "reconciled"
            );
        }
        Ok(())
    }

    async fn launch(&self, request: &StartTraining) -> Result<()> {
        let job = self.job_manifest(request)?;
        self.put_secret(request).await?;
        let mut created = self.jobs_api.create(&PostParams::default(), &job).await;
        if matches!(&created, Err(kube::Error::Api(status)) if status.code == 409)
            && self.remove_older(request.job_id, request.attempt).await?
        {
            created = self.jobs_api.create(&PostParams::default(), &job).await;
        }
        match created {
            Ok(created) => {
                if let Err(e) = self.own_secret(request.job_id, &created).await {
                    tracing::warn!(job_id = %request.job_id, error = %error_chain(&e), "could not make the Job own its callback Secret");
                }
                // Its pods wait for pod 0's name to resolve; the launch
                // fails (and is retried, adopting the Job) without it.
                self.put_peer_objects(request, &created).await?;
                tracing::info!(job_id = %request.job_id, name = %job_name(request.job_id), "created Kubernetes Job");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Created by this attempt before (a retried start, a
                // restarted backend) and still running: adopt it, provided
                // it is ours.
                let existing = self
                    .jobs_api
                    .get(&job_name(request.job_id))
                    .await
                    .map_err(from_kube)?;
                if !labelled_for(&existing, request.job_id) {
                    return Err(Error::conflict(format!(
                        "a Kubernetes Job named {} exists but is not labelled with job {}",
                        job_name(request.job_id),
                        request.job_id
                    )));
                }
                self.put_peer_objects(request, &existing).await?;
                tracing::info!(job_id = %request.job_id, "adopted the existing Kubernetes Job");
                Ok(())
            }
            Err(e) => Err(from_kube(e)),
        }
    }

    /// Deletes the Job of `job_id` if it runs attempt `attempt` or an
    /// earlier one (a relaunch may have replaced it already).
    async fn stop(&self, job_id: JobId, attempt: i32) -> Result<()> {
        let name = job_name(job_id);
        match self.jobs_api.get_opt(&name).await.map_err(from_kube)? {
            Some(existing)
                if labelled_for(&existing, job_id) && attempt_of(&existing) <= attempt =>
            {
                self.delete(&name, self.config.grace_period)
                    .await
                    .map(|_| ())
            }
            _ => Ok(()),
        }
    }

    async fn cancel(&self, job_id: JobId) -> Result<CancelOutcome> {
        if self
            .delete(&job_name(job_id), self.config.grace_period)
            .await?
        {
            Ok(CancelOutcome::Signalled)
        } else {
            Ok(CancelOutcome::NotRunning)
        }
    }

    async fn is_running(&self, job_id: JobId) -> Result<bool> {
        let Some(job) = self
            .jobs_api
            .get_opt(&job_name(job_id))
            .await
            .map_err(from_kube)?
        else {
            return Ok(false);
        };
        Ok(!job_finished(&job))
    }
}
