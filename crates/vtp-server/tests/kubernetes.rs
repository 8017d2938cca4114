//! The Kubernetes launcher with the real kube client against a fake API
//! server on loopback: the Job it creates, adoption, cancel, and every
//! failure the reconciler maps back to the job store.

#[path = "../../../tests/support/fake_kube.rs"]
mod fake_kube;

use std::sync::Arc;
use std::time::Duration;

use fake_kube::FakeKube;
use serde_json::{Value, json};
use vtp_core::launcher::{EXIT_NON_RETRYABLE, START_TRAINING_ENV};
use vtp_core::{
    CancelOutcome, Error, JobStatus, JobStore, JobStoreExt, NewJob, StartTraining, TrainerLauncher,
};
use vtp_launch::kubernetes::job_name;
use vtp_launch::{KubernetesConfig, KubernetesLauncher};
use vtp_storage::InMemoryJobStore;

const NS: &str = "vtp-test";

struct Env {
    kube: FakeKube,
    store: Arc<dyn JobStore>,
    launcher: KubernetesLauncher,
}

async fn env() -> Env {
    let kube = FakeKube::start().await;
    let store: Arc<dyn JobStore> = Arc::new(InMemoryJobStore::new());
    let config = KubernetesConfig {
        namespace: NS.into(),
        image: "registry.example/vtp-trainer:1.2.3".into(),
        service_account: Some("vtp-trainer".into()),
        s3_secret: Some("vtp-s3".into()),
        env: vec![
            ("VTP_BLOB_URL".into(), "s3://datasets/vtp".into()),
            ("VTP_S3_ENDPOINT".into(), "http://garage:3900".into()),
        ],
        backoff_limit: 1,
        settle_time: Duration::ZERO,
        ..KubernetesConfig::default()
    };
    let launcher = KubernetesLauncher::new(kube.client(NS), config, store.clone());
    Env {
        kube,
        store,
        launcher,
    }
}

/// A job in the store, moved to `status`, and its start request.
async fn job_in(env: &Env, status: JobStatus, config: Value) -> StartTraining {
    let mut job = NewJob {
        user_id: "u".into(),
        model_name: "small_cnn".into(),
        framework: "tch".into(),
        dataset_s3_uri: "s3://datasets/vtp/users/u/d.zip".into(),
        config: json!({}),
        priority: 0,
    }
    .into_job()
    .unwrap();
    // Stored as it is, unchecked: a job made before the checks it would fail
    // today (or by another backend version) still reaches the launcher,
    // which must refuse it itself.
    job.config = config;
    env.store.create(&job).await.unwrap();
    let path: &[JobStatus] = match status {
        JobStatus::Queued => &[JobStatus::Queued],
        JobStatus::Running => &[JobStatus::Queued, JobStatus::Running],
        JobStatus::Cancelling => &[JobStatus::Queued, JobStatus::Running, JobStatus::Cancelling],
        _ => &[],
    };
    let mut from = JobStatus::Pending;
    for to in path {
        env.store.transition(job.id, from, *to).await.unwrap();
        from = *to;
        if *to == JobStatus::Queued {
            // Handed to the launcher, as the queue's dispatcher does.
            env.store
                .update_with(job.id, |job| {
                    let mut next = job.clone();
                    next.launched_at = Some(vtp_core::job::now());
                    Ok(Some(next))
                })
                .await
                .unwrap();
        }
    }
    StartTraining::for_job(
        &job,
        format!("http://backend/training/jobs/{}/callback", job.id),
    )
    .with_secret(vtp_core::CallbackSecret::generate())
}

#[tokio::test]
async fn launch_creates_one_labelled_job_with_the_request_resources_and_policies() {
    let env = env().await;
    let request = job_in(
        &env,
        JobStatus::Queued,
        json!({"epochs": 3, "resources": {"cpu": "2", "memory": "3Gi", "gpu": 1}}),
    )
    .await;
    env.launcher.launch(&request).await.unwrap();

    let name = job_name(request.job_id);
    let job = env.kube.job(&name).expect("the Job was created");
    // The manifest is a valid batch/v1 Job.
    let typed: k8s_openapi::api::batch::v1::Job = serde_json::from_value(job.clone()).unwrap();
    let spec = typed.spec.unwrap();
    assert_eq!(
        job["metadata"]["labels"]["vtp.dev/job-id"],
        request.job_id.to_string()
    );
    assert_eq!(
        job["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "vtp"
    );
    assert_eq!(spec.backoff_limit, Some(1));
    assert_eq!(spec.active_deadline_seconds, Some(24 * 3600));
    assert_eq!(spec.ttl_seconds_after_finished, Some(3600));
    assert_eq!(job["metadata"]["labels"]["vtp.dev/attempt"], "1");
    let rules = spec.pod_failure_policy.unwrap().rules;
    // An eviction or a drain does not use up a retry: the pod is replaced.
    let ignore = &rules[0];
    assert_eq!(ignore.action, "Ignore");
    let conditions = ignore.on_pod_conditions.as_ref().unwrap();
    assert_eq!(
        (conditions[0].type_.as_str(), conditions[0].status.as_str()),
        ("DisruptionTarget", "True")
    );
    let rule = &rules[1];
    assert_eq!(rule.action, "FailJob");
    let codes = rule.on_exit_codes.as_ref().unwrap();
    assert_eq!(
        (codes.operator.as_str(), codes.values.as_slice()),
        ("In", &[EXIT_NON_RETRYABLE][..])
    );
    assert_eq!(codes.container_name.as_deref(), Some("trainer"));

    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.service_account_name.as_deref(), Some("vtp-trainer"));
    assert_eq!(pod.termination_grace_period_seconds, Some(30));
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/vtp-trainer:1.2.3")
    );
    assert_eq!(container.args.as_deref(), Some(&["run-job".to_owned()][..]));
    let env_vars = container.env.clone().unwrap();
    let value_of = |name: &str| {
        env_vars
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    let from_secret = |name: &str| {
        env_vars
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.clone())
            .and_then(|v| v.secret_key_ref)
            .unwrap_or_else(|| panic!("{name} comes from a Secret"))
    };
    let mut public = request.clone();
    let secret = public.callback_secret.take().unwrap();
    // Neither the start request (the job's config) nor the callback secret
    // is in the pod spec: both are in the job's own Secret, owned by the Job.
    assert_eq!(value_of(START_TRAINING_ENV), None);
    let text = job.to_string();
    assert!(
        !text.contains(secret.expose()),
        "the secret leaked into the Job"
    );
    assert!(
        !text.contains("\"epochs\"") && !text.contains(&request.config.to_string()),
        "the config leaked into the Job: {text}"
    );
    let reference = from_secret(START_TRAINING_ENV);
    let stored = env.kube.secret(&reference.name).expect("the Secret exists");
    let sent: StartTraining =
        serde_json::from_str(stored["stringData"][&reference.key].as_str().unwrap()).unwrap();
    assert_eq!(
        sent, public,
        "the pod gets the job's start request, without its secret"
    );
    let reference = from_secret("VTP_CALLBACK_SECRET");
    assert_eq!(stored["stringData"][&reference.key], secret.expose());
    assert_eq!(stored["metadata"]["ownerReferences"][0]["kind"], "Job");
    assert_eq!(
        stored["metadata"]["ownerReferences"][0]["uid"],
        job["metadata"]["uid"]
    );
    assert_eq!(
        value_of("VTP_BACKEND_URL").as_deref(),
        Some("http://backend")
    );
    assert_eq!(
        value_of("VTP_BLOB_URL").as_deref(),
        Some("s3://datasets/vtp")
    );
    // Credentials come from Secrets, never inline.
    assert!(
        env_vars
            .iter()
            .filter(|e| e.name.contains("SECRET") || e.name.contains("ACCESS_KEY"))
            .all(|e| e.value.is_none() && e.value_from.is_some())
    );
    let from = container.env_from.clone().unwrap();
    assert_eq!(from[0].secret_ref.as_ref().unwrap().name, "vtp-s3");
    let resources = container.resources.clone().unwrap();
    let limits = resources.limits.unwrap();
    assert_eq!(limits["cpu"].0, "2");
    assert_eq!(limits["memory"].0, "3Gi");
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "2");
    // Disk from the dataset's size (unknown here: 1 GiB is assumed):
    // the archive, twice it unpacked, 2 GiB of work; the trainer is told
    // its share for unpacking.
    assert_eq!(limits["ephemeral-storage"].0, "5120Mi");
    assert_eq!(
        resources.requests.as_ref().unwrap()["ephemeral-storage"].0,
        "5120Mi"
    );
    assert_eq!(
        value_of("VTP_MAX_UNPACKED_BYTES").as_deref(),
        Some("2147483648")
    );

    // A hardened pod: not root, nothing written outside its own empty
    // directories, no capability, no escalation, the default seccomp
    // profile, no API token.
    let pod_security = pod.security_context.clone().unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(pod_security.run_as_user, Some(10001));
    assert_eq!(
        pod_security.seccomp_profile.unwrap().type_,
        "RuntimeDefault"
    );
    assert_eq!(pod.automount_service_account_token, Some(false));
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.unwrap().drop,
        Some(vec!["ALL".to_owned()])
    );
    let volumes = pod.volumes.clone().unwrap();
    let work = volumes.iter().find(|v| v.name == "work").unwrap();
    assert_eq!(
        work.empty_dir
            .as_ref()
            .unwrap()
            .size_limit
            .as_ref()
            .unwrap()
            .0,
        "5120Mi"
    );
    let mounts = container.volume_mounts.clone().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m.name == "work" && m.mount_path == "/work")
    );
    assert!(
        mounts
            .iter()
            .any(|m| m.name == "tmp" && m.mount_path == "/tmp")
    );
    assert_eq!(value_of("VTP_WORK_DIR").as_deref(), Some("/work"));

    // A larger dataset gets more disk; one beyond the largest allowed is
    // refused at launch, naming the dataset.
    let mut big = request.clone();
    big.dataset_bytes = Some(10 << 30);
    let manifest = env.launcher.job_manifest(&big).unwrap();
    let limits = manifest.spec.unwrap().template.spec.unwrap().containers[0]
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert_eq!(limits["ephemeral-storage"].0, format!("{}Mi", 32 * 1024));
    big.dataset_bytes = Some(30 << 30);
    match env.launcher.job_manifest(&big) {
        Err(vtp_core::Error::InvalidInput { field, .. }) => assert_eq!(field, "dataset_s3_uri"),
        other => panic!("{other:?}"),
    }

    // A second launch (a retried start, a restarted backend) adopts it.
    env.launcher.launch(&request).await.unwrap();
    assert_eq!(env.kube.job_names(), vec![name.clone()]);
    assert!(env.launcher.is_running(request.job_id).await.unwrap());

    // Defaults when the config names no resources; a bad one is refused.
    let plain = job_in(&env, JobStatus::Queued, json!({})).await;
    let manifest = env.launcher.job_manifest(&plain).unwrap();
    let limits = manifest.spec.unwrap().template.spec.unwrap().containers[0]
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert_eq!(
        (limits["cpu"].0.as_str(), limits["memory"].0.as_str()),
        ("1", "2Gi")
    );
    assert!(!limits.contains_key("nvidia.com/gpu"));
    let bad = job_in(&env, JobStatus::Queued, json!({"resources": {"cpus": 2}})).await;
    let err = env.launcher.launch(&bad).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { ref field, .. } if field == "config.resources"),
        "{err}"
    );
}

#[tokio::test]
async fn resources_beyond_the_operators_maxima_are_refused_before_any_job_is_made() {
    let env = env().await;
    let max = &env.launcher.config().max_resources;
    assert_eq!(
        (max.cpu.as_str(), max.memory.as_str(), max.gpu),
        ("8", "32Gi", 1)
    );
    // Quantities compare across suffixes: 32Gi is 34.4G.
    for fits in [
        json!({"cpu": "8", "memory": "32Gi", "gpu": 1}),
        json!({"cpu": "7500m", "memory": "34G"}),
        json!({"memory": "32768Mi", "gpu": 0}),
        json!({}),
    ] {
        let config = json!({ "resources": fits });
        if let Err(e) = env.launcher.check_config(&config) {
            panic!("{fits}: {e}");
        }
    }
    env.launcher.check_config(&json!({"epochs": 1})).unwrap();
    // A field left out gets its default, never "unlimited".
    for partial in [json!({"gpu": 1}), json!({})] {
        let got = env
            .launcher
            .resources_of(&json!({ "resources": partial }))
            .unwrap();
        assert_eq!(
            (got.cpu.as_deref(), got.memory.as_deref()),
            (Some("1"), Some("2Gi")),
            "{partial}"
        );
    }
    for (asked, field) in [
        (json!({"cpu": "8001m"}), "config.resources.cpu"),
        (json!({"cpu": "9"}), "config.resources.cpu"),
        (json!({"memory": "33Gi"}), "config.resources.memory"),
        (json!({"memory": "35G"}), "config.resources.memory"),
        (json!({"memory": "1Ei"}), "config.resources.memory"),
        (json!({"gpu": 2}), "config.resources.gpu"),
        // Not quantities at all, or nothing: refused here, not by the API server.
        (json!({"cpu": "lots"}), "config.resources.cpu"),
        (json!({"cpu": "-1"}), "config.resources.cpu"),
        (json!({"cpu": "0"}), "config.resources.cpu"),
        (json!({"memory": ""}), "config.resources.memory"),
        (
            json!({"memory": "4Gi; rm -rf /"}),
            "config.resources.memory",
        ),
        (json!({"memory": "NaN"}), "config.resources.memory"),
        (
            json!({"memory": format!("1{}", "0".repeat(40))}),
            "config.resources.memory",
        ),
        (json!({"disk": "1Ti"}), "config.resources"),
    ] {
        let config = json!({ "resources": asked });
        match env.launcher.check_config(&config) {
            Err(Error::InvalidInput { field: got, .. }) => assert_eq!(got, field, "{asked}"),
            other => panic!("{asked}: {other:?}"),
        }
        // A job created before the maxima were lowered is refused at launch
        // too, and no Job or Secret is made for it.
        let request = job_in(&env, JobStatus::Queued, config).await;
        assert!(
            matches!(
                env.launcher.launch(&request).await,
                Err(Error::InvalidInput { .. })
            ),
            "{asked}"
        );
        assert!(env.kube.job(&job_name(request.job_id)).is_none());
        assert!(
            env.kube
                .secret(&vtp_launch::kubernetes::secret_name(request.job_id))
                .is_none()
        );
    }
}

#[tokio::test]
async fn a_script_runs_in_an_allow_listed_image_and_no_other() {
    let env = env().await;
    // None allow-listed (the default): any `config.image` is refused.
    match env.launcher.check_config(&json!({"image": "python:3.11"})) {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "config.image"),
        other => panic!("{other:?}"),
    }
    let kube = env.kube.clone();
    let store: Arc<dyn JobStore> = Arc::new(InMemoryJobStore::new());
    let listed = KubernetesLauncher::new(
        kube.client(NS),
        KubernetesConfig {
            script_images: vec!["registry.example/vtp-trainer:timm".into()],
            ..env.launcher.config().clone()
        },
        store.clone(),
    );
    let env = Env {
        kube,
        store,
        launcher: listed,
    };
    let script = json!({"code_s3_uri": "s3://datasets/vtp/users/u/code/c/t.zip",
        "entrypoint": "train.py", "image": "registry.example/vtp-trainer:timm"});
    env.launcher.check_config(&script).unwrap();
    let mut other = script.clone();
    other["image"] = json!("evil.example/miner:latest");
    match env.launcher.check_config(&other) {
        Err(Error::InvalidInput { field, message }) => {
            assert_eq!(field, "config.image");
            assert!(message.contains("vtp-trainer:timm"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The Job's one container runs the allow-listed image; a job without
    // one runs the trainer's.
    let request = job_in(&env, JobStatus::Queued, script).await;
    env.launcher.launch(&request).await.unwrap();
    let job = env.kube.job(&job_name(request.job_id)).unwrap();
    let containers = &job["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers[0]["image"], "registry.example/vtp-trainer:timm");
    assert_eq!(containers.as_array().unwrap().len(), 1);
    let plain = job_in(&env, JobStatus::Queued, json!({})).await;
    env.launcher.launch(&plain).await.unwrap();
    let job = env.kube.job(&job_name(plain.job_id)).unwrap();
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/vtp-trainer:1.2.3"
    );
    // Taken off the list after the job was made: refused at launch, and
    // no Job is made.
    let late = job_in(&env, JobStatus::Queued, other).await;
    assert!(matches!(
        env.launcher.launch(&late).await,
        Err(Error::InvalidInput { .. })
    ));
    assert!(env.kube.job(&job_name(late.job_id)).is_none());
}

#[tokio::test]
async fn a_run_across_machines_is_an_indexed_job_whose_pods_find_pod_0_through_a_headless_service()
{
    let env = env().await;
    let script = json!({"code_s3_uri": "s3://datasets/vtp/users/u/code/c/t.zip",
        "entrypoint": "train.py", "distributed": {"nproc_per_node": 4, "nnodes": 3},
        "resources": {"cpu": "4", "memory": "2Gi", "gpu": 1}});
    // Only this launcher runs trainers on several machines; the others
    // refuse it at create.
    env.launcher.check_config(&script).unwrap();
    let http = vtp_launch::HttpLauncher::new("http://127.0.0.1:9").unwrap();
    match http.check_config(&script) {
        Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "config.distributed.nnodes"),
        other => panic!("{other:?}"),
    }
    let request = job_in(&env, JobStatus::Queued, script).await;
    env.launcher.launch(&request).await.unwrap();
    let name = job_name(request.job_id);
    let job = env.kube.job(&name).unwrap();
    let typed: k8s_openapi::api::batch::v1::Job = serde_json::from_value(job.clone()).unwrap();
    let spec = typed.spec.unwrap();
    // One pod per machine, each knowing its rank by its completion index.
    assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
    assert_eq!((spec.completions, spec.parallelism), (Some(3), Some(3)));
    let pod = spec.template.spec.unwrap();
    let service = format!("{name}-1");
    assert_eq!(pod.subdomain.as_deref(), Some(service.as_str()));
    let container = &pod.containers[0];
    // Each pod asks for the job's resources, its GPU too.
    let requests = container
        .resources
        .as_ref()
        .unwrap()
        .requests
        .clone()
        .unwrap();
    assert_eq!(requests["nvidia.com/gpu"].0, "1");
    assert_eq!(requests["cpu"].0, "4");
    let env_vars = container.env.clone().unwrap();
    let value_of = |name: &str| {
        env_vars
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        value_of("VTP_MASTER_ADDR"),
        Some(format!("{name}-0.{service}"))
    );
    assert_eq!(value_of("VTP_MASTER_PORT").as_deref(), Some("29500"));

    // The headless Service selects this attempt's pods, and goes with the Job.
    let svc = env
        .kube
        .service(&service)
        .expect("the rendezvous Service exists");
    let typed: k8s_openapi::api::core::v1::Service = serde_json::from_value(svc.clone()).unwrap();
    let svc_spec = typed.spec.unwrap();
    assert_eq!(svc_spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(svc_spec.publish_not_ready_addresses, Some(true));
    let selector = svc_spec.selector.unwrap();
    assert_eq!(selector["vtp.dev/job-id"], request.job_id.to_string());
    assert_eq!(selector["vtp.dev/attempt"], "1");
    let labels = pod_labels(&job);
    for (key, value) in &selector {
        assert_eq!(labels[key.as_str()], value.as_str(), "the pods carry {key}");
    }
    assert_eq!(svc_spec.ports.unwrap()[0].port, 29500);
    let owner = &svc["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), &owner["uid"]),
        (Some("Job"), &job["metadata"]["uid"])
    );

    // Its pods, and only them, reach each other (the base policy lets
    // nothing reach a trainer).
    let policy = env
        .kube
        .network_policy(&service)
        .expect("the attempt's NetworkPolicy");
    let typed: k8s_openapi::api::networking::v1::NetworkPolicy =
        serde_json::from_value(policy.clone()).unwrap();
    let policy_spec = typed.spec.unwrap();
    let these = policy_spec.pod_selector.unwrap().match_labels.unwrap();
    assert_eq!(these, selector);
    let ingress = policy_spec.ingress.unwrap();
    let egress = policy_spec.egress.unwrap();
    let from = ingress[0].from.as_ref().unwrap()[0]
        .pod_selector
        .clone()
        .unwrap();
    let to = egress[0].to.as_ref().unwrap()[0]
        .pod_selector
        .clone()
        .unwrap();
    assert_eq!(from.match_labels.as_ref(), Some(&selector));
    assert_eq!(to.match_labels.as_ref(), Some(&selector));
    assert_eq!(
        policy["metadata"]["ownerReferences"][0]["uid"],
        job["metadata"]["uid"]
    );

    // Launched again (a retried start): the Job is adopted, the Service kept.
    env.launcher.launch(&request).await.unwrap();
    let posts = env
        .kube
        .seen()
        .iter()
        .filter(|s| s.method == "POST" && s.name == service)
        .count();
    assert_eq!(
        posts, 4,
        "the Service and the NetworkPolicy, asked again, and kept"
    );
    assert!(env.kube.service(&service).is_some());
    assert!(env.kube.network_policy(&service).is_some());

    // A job on one machine has neither.
    let plain = job_in(&env, JobStatus::Queued, json!({})).await;
    env.launcher.launch(&plain).await.unwrap();
    let job = env.kube.job(&job_name(plain.job_id)).unwrap();
    assert!(job["spec"].get("completionMode").is_none(), "{job}");
    assert!(job["spec"]["template"]["spec"].get("subdomain").is_none());
    assert!(
        env.kube
            .service(&format!("{}-1", job_name(plain.job_id)))
            .is_none()
    );
}

fn pod_labels(job: &Value) -> serde_json::Map<String, Value> {
    job["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_job_of_the_same_name_that_is_not_ours_is_a_conflict() {
    let env = env().await;
    let request = job_in(&env, JobStatus::Queued, json!({})).await;
    env.kube.put_job(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job_name(request.job_id), "labels": {"vtp.dev/job-id": "someone-else"}},
        "spec": {"template": {"spec": {"containers": []}}}
    }));
    let err = env.launcher.launch(&request).await.unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
}

#[tokio::test]
async fn cancel_deletes_the_job_in_the_foreground_after_the_grace_period() {
    let env = env().await;
    let request = job_in(&env, JobStatus::Running, json!({})).await;
    env.launcher.launch(&request).await.unwrap();
    let outcome = env.launcher.cancel(request.job_id).await.unwrap();
    assert_eq!(outcome, CancelOutcome::Signalled);
    let delete = env
        .kube
        .seen()
        .into_iter()
        .find(|s| s.method == "DELETE" && s.name == job_name(request.job_id))
        .unwrap();
    assert!(
        env.kube
            .secret(&format!("{}-callback", job_name(request.job_id)))
            .is_none(),
        "the job's callback Secret goes with it"
    );
    assert_eq!(delete.body["propagationPolicy"], "Foreground");
    assert_eq!(delete.body["gracePeriodSeconds"], 30);
    assert!(env.kube.job(&job_name(request.job_id)).is_none());
    assert_eq!(
        env.launcher.cancel(request.job_id).await.unwrap(),
        CancelOutcome::NotRunning
    );
    assert!(!env.launcher.is_running(request.job_id).await.unwrap());
}

#[tokio::test]
async fn stopping_an_attempt_leaves_the_job_of_a_later_one() {
    let env = env().await;
    let mut request = job_in(&env, JobStatus::Running, json!({})).await;
    request.attempt = 2;
    env.launcher.launch(&request).await.unwrap();
    let name = job_name(request.job_id);
    // A late stop of the first attempt: the second's Job stays.
    env.launcher.stop(request.job_id, 1).await.unwrap();
    assert!(env.kube.job(&name).is_some());
    assert!(env.launcher.is_running(request.job_id).await.unwrap());
    // The second attempt's lease expired: its Job goes.
    env.launcher.stop(request.job_id, 2).await.unwrap();
    assert!(env.kube.job(&name).is_none());
    // Nothing left to stop is no error.
    env.launcher.stop(request.job_id, 2).await.unwrap();
}

#[tokio::test]
async fn the_reconciler_ends_every_lost_job_with_its_reason() {
    let env = env().await;
    let launch = |config: Value, status: JobStatus| {
        let env = &env;
        async move {
            let request = job_in(env, status, config).await;
            env.launcher.launch(&request).await.unwrap();
            (request.job_id, job_name(request.job_id))
        }
    };
    // Deadline exceeded.
    let (deadline, name) = launch(json!({}), JobStatus::Running).await;
    env.kube.set_condition(
        &name,
        "Failed",
        "DeadlineExceeded",
        "Job was active longer than specified deadline",
    );
    // Evicted, then out of retries: worth another attempt.
    let (evicted, evicted_name) = launch(json!({}), JobStatus::Running).await;
    let name = evicted_name.clone();
    env.kube.set_condition(
        &name,
        "Failed",
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
    );
    env.kube.add_pod(
        &name,
        &format!("{name}-abcde"),
        json!({
            "phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory."
        }),
    );
    // The trainer refused the job: exit code 3 and the pod failure policy.
    let (refused, name) = launch(json!({}), JobStatus::Running).await;
    env.kube.set_condition(
        &name,
        "Failed",
        "PodFailurePolicy",
        "Container trainer for pod x failed with exit code 3",
    );
    env.kube.add_pod(&name, &format!("{name}-fghij"), json!({
        "phase": "Failed",
        "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 3, "reason": "Error"}}}]
    }));
    // The image cannot be pulled: the Job would wait forever.
    let (unpullable, pull_name) = launch(json!({}), JobStatus::Queued).await;
    env.kube.add_pod(&pull_name, &format!("{pull_name}-klmno"), json!({
        "phase": "Pending",
        "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"registry.example/vtp-trainer:1.2.3\""}}}]
    }));
    // The Job vanished while the backend was not looking.
    let (vanished, name) = launch(json!({}), JobStatus::Running).await;
    env.kube.vanish(&name);
    // Cancelled, and the Job is gone before the trainer reported.
    let (cancelling, name) = launch(json!({}), JobStatus::Cancelling).await;
    env.kube.vanish(&name);
    // Completed, but the final report never came.
    let (silent, name) = launch(json!({}), JobStatus::Running).await;
    env.kube.set_condition(&name, "Complete", "Completed", "");
    // Healthy and running.
    let (healthy, name) = launch(json!({}), JobStatus::Running).await;
    env.kube.add_pod(&name, &format!("{name}-pqrst"), json!({
        "phase": "Running",
        "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
            "state": {"running": {}}}]
    }));

    let pages_before = env.kube.list_pages();
    let done = env.launcher.reconcile_pass().await.unwrap();
    assert_eq!(done.running, 1, "{done:?}");
    assert_eq!(done.ended.len(), 7, "{done:?}");
    assert!(env.kube.list_pages() > pages_before, "the listing is paged");
    // A failed Job whose reason is recorded need not stay long.
    let patched: Vec<String> = env
        .kube
        .seen()
        .into_iter()
        .filter(|s| s.method == "PATCH")
        .map(|s| {
            assert_eq!(
                s.body["spec"]["ttlSecondsAfterFinished"], 600,
                "{:?}",
                s.body
            );
            s.name
        })
        .collect();
    for id in [deadline, refused, evicted] {
        assert!(patched.contains(&job_name(id)), "{patched:?}");
    }

    let ended = |id| {
        let store = env.store.clone();
        async move { store.get(id).await.unwrap() }
    };
    for (id, expected) in [
        (deadline, "DeadlineExceeded"),
        (refused, "exited with code 3"),
        (unpullable, "ImagePullBackOff"),
        (silent, "final report never arrived"),
    ] {
        let job = ended(id).await;
        assert_eq!(job.status, JobStatus::Failed, "{expected}: {job:?}");
        let error = job.error.unwrap();
        assert!(error.contains(expected), "{expected:?} in {error:?}");
    }
    // Pods that crashed out of retries, a Job gone: the attempt ends, and
    // the job waits for its relaunch (resuming from its last set).
    for (id, expected) in [
        (evicted, "Evicted: The node was low on resource: memory."),
        (vanished, "vanished"),
    ] {
        let job = ended(id).await;
        assert_eq!(
            (job.status, job.attempt),
            (JobStatus::Queued, 2),
            "{expected}: {job:?}"
        );
        assert!(
            job.attempts[0].reason.contains(expected),
            "{expected:?} in {job:?}"
        );
    }
    let job = ended(cancelling).await;
    assert_eq!(job.status, JobStatus::Cancelled);
    assert!(job.message.unwrap().contains("was deleted"));
    assert_eq!(ended(healthy).await.status, JobStatus::Running);
    // The unpullable Job was deleted; nothing else was.
    assert!(env.kube.job(&pull_name).is_none());

    // A second pass finds nothing more to do: the failed Job of the
    // evicted job's first attempt is not judged again.
    let again = env.launcher.reconcile_pass().await.unwrap();
    assert_eq!((again.running, again.ended.len()), (1, 0));

    // The relaunch replaces that finished Job with the second attempt's.
    let job = env.store.get(evicted).await.unwrap();
    let relaunch = StartTraining::for_job(&job, "http://127.0.0.1:8000/cb".into())
        .with_secret(vtp_core::CallbackSecret::generate());
    env.launcher.launch(&relaunch).await.unwrap();
    let second = env
        .kube
        .job(&evicted_name)
        .expect("the second attempt's Job");
    assert_eq!(second["metadata"]["labels"]["vtp.dev/attempt"], "2");
    assert!(
        second["status"]["conditions"].is_null(),
        "a fresh Job: {second}"
    );
    assert!(env.launcher.is_running(evicted).await.unwrap());
}

#[tokio::test]
async fn the_reconciler_deletes_the_running_job_of_a_job_that_is_over() {
    let env = env().await;
    // The sweeper failed this job while its pod still trains.
    let over = job_in(&env, JobStatus::Running, json!({})).await;
    env.launcher.launch(&over).await.unwrap();
    env.store
        .finalize_lost(over.job_id, "no report for an hour")
        .await
        .unwrap();
    // This one completed; its finished Job stays for inspection (TTL).
    let done = job_in(&env, JobStatus::Running, json!({})).await;
    env.launcher.launch(&done).await.unwrap();
    env.store
        .apply_report(
            done.job_id,
            &vtp_core::TrainingReport::new(JobStatus::Completed).with_seq(1),
        )
        .await
        .unwrap();
    env.kube
        .set_condition(&job_name(done.job_id), "Complete", "Completed", "");
    // A running one is left alone.
    let running = job_in(&env, JobStatus::Running, json!({})).await;
    env.launcher.launch(&running).await.unwrap();

    let pass = env.launcher.reconcile_pass().await.unwrap();
    assert_eq!(pass.deleted, vec![over.job_id], "{pass:?}");
    assert!(env.kube.job(&job_name(over.job_id)).is_none());
    assert!(
        env.kube
            .secret(&vtp_launch::kubernetes::secret_name(over.job_id))
            .is_none(),
        "its callback Secret goes too"
    );
    assert!(env.kube.job(&job_name(done.job_id)).is_some());
    assert!(env.kube.job(&job_name(running.job_id)).is_some());
    assert_eq!(pass.running, 1);
    let again = env.launcher.reconcile_pass().await.unwrap();
    assert!(again.deleted.is_empty(), "{again:?}");
}

/// With a Kueue `LocalQueue` named, every job is handed over at once as a
/// suspended Job with the queue's label, and waits there: the backend's
/// sweeper asks, and is told it is not admitted yet, until Kueue lifts the
/// suspension.
#[tokio::test]
async fn kueue_admits_suspended_jobs_and_a_suspended_job_is_waiting_not_lost() {
    let kube = FakeKube::start().await;
    let store: Arc<dyn JobStore> = Arc::new(InMemoryJobStore::new());
    let config = KubernetesConfig {
        namespace: NS.into(),
        kueue_queue: Some("team-a".into()),
        settle_time: Duration::ZERO,
        ..KubernetesConfig::default()
    };
    let launcher = KubernetesLauncher::new(kube.client(NS), config, store.clone());
    let env = Env {
        kube,
        store,
        launcher,
    };
    assert_eq!(
        env.launcher.capacity().await.unwrap(),
        vtp_core::Capacity::Admitted
    );
    let request = job_in(&env, JobStatus::Queued, json!({})).await;
    env.launcher.launch(&request).await.unwrap();
    let name = job_name(request.job_id);
    let job = env.kube.job(&name).unwrap();
    assert_eq!(job["spec"]["suspend"], true);
    assert_eq!(
        job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"],
        "team-a"
    );
    assert!(
        env.launcher
            .waiting_for_admission(request.job_id)
            .await
            .unwrap()
    );
    // The reconciler leaves it be, and remembers it as waiting.
    let done = env.launcher.reconcile_pass().await.unwrap();
    assert_eq!((done.running, done.ended.len()), (1, 0), "{done:?}");
    assert!(
        env.launcher
            .waiting_for_admission(request.job_id)
            .await
            .unwrap()
    );
    // Admitted: it runs like any other.
    env.kube.admit(&name);
    env.launcher.reconcile_pass().await.unwrap();
    assert!(
        !env.launcher
            .waiting_for_admission(request.job_id)
            .await
            .unwrap()
    );
    // Without Kueue, the backend's own slots.
    let plain = env_plain_capacity().await;
    assert_eq!(plain, vtp_core::Capacity::Slots(8));
}

async fn env_plain_capacity() -> vtp_core::Capacity {
    env().await.launcher.capacity().await.unwrap()
}
