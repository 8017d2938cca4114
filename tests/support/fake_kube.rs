//! A fake Kubernetes API server on loopback, speaking the REST protocol for
//! the calls the Kubernetes launcher makes: create, get, list (with a label
//! selector, in pages of `limit` with a `continue` token), merge-patch and
//! delete `batch/v1` Jobs, create, read, replace and delete Secrets,
//! create, read and delete Services and NetworkPolicies, and list pods. The real kube client talks to it. Tests set Job conditions
//! and pod statuses to play the cluster; with [`FakeKube::run_pods_with`],
//! each created Job's container runs as a local process (a tiny kubelet),
//! unless the Job is suspended (as Kueue leaves it until it admits it). A
//! kubelet that panics fails the create with its message, and the message
//! is kept for [`FakeKube::check_kubelet`]: the test fails, not a thread of
//! the server.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `POST`, `GET`, `DELETE`.
    pub method: &'static str,
    /// The object's name, or `""` for collections.
    pub name: String,
    /// The JSON body (a Job on create, `DeleteOptions` on delete).
    pub body: Value,
}

type Kubelet = Arc<dyn Fn(&Value) + Send + Sync>;

#[derive(Default)]
struct Cluster {
    jobs: BTreeMap<String, Value>,
    pods: BTreeMap<String, Value>,
    secrets: BTreeMap<String, Value>,
    /// Services and NetworkPolicies, by collection and name.
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    seen: Vec<Seen>,
    kubelet: Option<Kubelet>,
    /// What a kubelet that panicked said.
    kubelet_failures: Vec<String>,
    /// Pages served by a Job listing with a `limit`.
    list_pages: usize,
}

/// The fake API server.
#[derive(Clone)]
pub struct FakeKube {
    url: String,
    cluster: Arc<Mutex<Cluster>>,
}

fn status(code: u16, reason: &str, message: String) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code
        })),
    )
        .into_response()
}

/// Whether `labels` match a `k=v,k2=v2` selector.
fn selected(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    selector.split(',').filter(|s| !s.is_empty()).all(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        object["metadata"]["labels"][key].as_str() == Some(value)
    })
}

type Shared = Arc<Mutex<Cluster>>;

async fn create_job(
    State(cluster): State<Shared>,
    Path(namespace): Path<String>,
    Json(mut job): Json<Value>,
) -> Response {
    let name = job["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let kubelet = {
        let mut c = cluster.lock().unwrap();
        c.seen.push(Seen {
            method: "POST",
            name: name.clone(),
            body: job.clone(),
        });
        if c.jobs.contains_key(&name) {
            return status(
                409,
                "AlreadyExists",
                format!("jobs.batch \"{name}\" already exists"),
            );
        }
        job["metadata"]["namespace"] = json!(namespace);
        job["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
        job["metadata"]["resourceVersion"] = json!("1");
        job["metadata"]["creationTimestamp"] =
            json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        job["status"] = json!({"active": 1});
        c.jobs.insert(name, job.clone());
        c.kubelet.clone()
    };
    let suspended = job["spec"]["suspend"].as_bool() == Some(true);
    if let Some(kubelet) = kubelet.filter(|_| !suspended) {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kubelet(&job)));
        if let Err(panic) = ran {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "the kubelet panicked".to_owned());
            cluster
                .lock()
                .unwrap()
                .kubelet_failures
                .push(message.clone());
            return status(500, "InternalError", format!("kubelet: {message}"));
        }
    }
    (StatusCode::CREATED, Json(job)).into_response()
}

async fn list_jobs(
    State(cluster): State<Shared>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let mut c = cluster.lock().unwrap();
    let after = query.get("continue").cloned().unwrap_or_default();
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let mut items: Vec<Value> = c
        .jobs
        .iter()
        .filter(|(name, _)| after.is_empty() || name.as_str() > after.as_str())
        .map(|(_, job)| job)
        .filter(|j| selected(j, query.get("labelSelector")))
        .cloned()
        .collect();
    let mut metadata = json!({"resourceVersion": "1"});
    if let Some(limit) = limit {
        c.list_pages += 1;
        if items.len() > limit {
            items.truncate(limit);
            metadata["continue"] = items.last().unwrap()["metadata"]["name"].clone();
        }
    }
    Json(json!({"apiVersion": "batch/v1", "kind": "JobList", "metadata": metadata, "items": items}))
        .into_response()
}

/// A JSON merge patch (RFC 7396) of `target` with `patch`.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

async fn patch_job(
    State(cluster): State<Shared>,
    Path((_, name)): Path<(String, String)>,
    Json(patch): Json<Value>,
) -> Response {
    let mut c = cluster.lock().unwrap();
    c.seen.push(Seen {
        method: "PATCH",
        name: name.clone(),
        body: patch.clone(),
    });
    match c.jobs.get_mut(&name) {
        Some(job) => {
            merge(job, &patch);
            Json(job.clone()).into_response()
        }
        None => status(404, "NotFound", format!("jobs.batch \"{name}\" not found")),
    }
}

async fn get_job(
    State(cluster): State<Shared>,
    Path((_, name)): Path<(String, String)>,
) -> Response {
    let mut c = cluster.lock().unwrap();
    c.seen.push(Seen {
        method: "GET",
        name: name.clone(),
        body: Value::Null,
    });
    match c.jobs.get(&name) {
        Some(job) => Json(job.clone()).into_response(),
        None => status(404, "NotFound", format!("jobs.batch \"{name}\" not found")),
    }
}

async fn delete_job(
    State(cluster): State<Shared>,
    Path((_, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let mut c = cluster.lock().unwrap();
    let options: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    c.seen.push(Seen {
        method: "DELETE",
        name: name.clone(),
        body: options,
    });
    match c.jobs.remove(&name) {
        Some(mut job) => {
            c.pods
                .retain(|_, pod| pod["metadata"]["labels"]["job-name"].as_str() != Some(&name));
            job["metadata"]["deletionTimestamp"] =
                json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            Json(job).into_response()
        }
        None => status(404, "NotFound", format!("jobs.batch \"{name}\" not found")),
    }
}

async fn create_secret(
    State(cluster): State<Shared>,
    Path(namespace): Path<String>,
    Json(mut secret): Json<Value>,
) -> Response {
    let name = secret["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut c = cluster.lock().unwrap();
    c.seen.push(Seen {
        method: "POST",
        name: name.clone(),
        body: secret.clone(),
    });
    if c.secrets.contains_key(&name) {
        return status(
            409,
            "AlreadyExists",
            format!("secrets \"{name}\" already exists"),
        );
    }
    secret["metadata"]["namespace"] = json!(namespace);
    secret["metadata"]["resourceVersion"] = json!("1");
    c.secrets.insert(name, secret.clone());
    (StatusCode::CREATED, Json(secret)).into_response()
}

async fn get_secret(
    State(cluster): State<Shared>,
    Path((_, name)): Path<(String, String)>,
) -> Response {
    match cluster.lock().unwrap().secrets.get(&name) {
        Some(secret) => Json(secret.clone()).into_response(),
        None => status(404, "NotFound", format!("secrets \"{name}\" not found")),
    }
}

async fn replace_secret(
    State(cluster): State<Shared>,
    Path((_, name)): Path<(String, String)>,
    Json(secret): Json<Value>,
) -> Response {
    let mut c = cluster.lock().unwrap();
    c.seen.push(Seen {
        method: "PUT",
        name: name.clone(),
        body: secret.clone(),
    });
    if !c.secrets.contains_key(&name) {
        return status(404, "NotFound", format!("secrets \"{name}\" not found"));
    }
    c.secrets.insert(name, secret.clone());
    Json(secret).into_response()
}

async fn delete_secret(
    State(cluster): State<Shared>,
    Path((_, name)): Path<(String, String)>,
) -> Response {
    let mut c = cluster.lock().unwrap();
    c.seen.push(Seen {
        method: "DELETE",
        name: name.clone(),
        body: Value::Null,
    });
    match c.secrets.remove(&name) {
        Some(secret) => Json(secret).into_response(),
        None => status(404, "NotFound", format!("secrets \"{name}\" not found")),
    }
}

/// Creates an object of the collection `plural` (`services`, `networkpolicies`).
async fn create_object(
    plural: &'static str,
    cluster: Shared,
    namespace: String,
    mut object: Value,
) -> Response {
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut c = cluster.lock().unwrap();
    c.seen.push(Seen {
        method: "POST",
        name: name.clone(),
        body: object.clone(),
    });
    let objects = c.objects.entry(plural).or_default();
    if objects.contains_key(&name) {
        return status(
            409,
            "AlreadyExists",
            format!("{plural} \"{name}\" already exists"),
        );
    }
    object["metadata"]["namespace"] = json!(namespace);
    object["metadata"]["resourceVersion"] = json!("1");
    objects.insert(name, object.clone());
    (StatusCode::CREATED, Json(object)).into_response()
}

async fn get_object(plural: &'static str, cluster: Shared, name: String) -> Response {
    let c = cluster.lock().unwrap();
    match c.objects.get(plural).and_then(|objects| objects.get(&name)) {
        Some(object) => Json(object.clone()).into_response(),
        None => status(404, "NotFound", format!("{plural} \"{name}\" not found")),
    }
}

async fn delete_object(plural: &'static str, cluster: Shared, name: String) -> Response {
    let mut c = cluster.lock().unwrap();
    c.seen.push(Seen {
        method: "DELETE",
        name: name.clone(),
        body: Value::Null,
    });
    match c
        .objects
        .get_mut(plural)
        .and_then(|objects| objects.remove(&name))
    {
        Some(object) => Json(object).into_response(),
        None => status(404, "NotFound", format!("{plural} \"{name}\" not found")),
    }
}

/// The routes of the collection `plural` under `prefix` (`/api/v1`,
/// `/apis/networking.k8s.io/v1`): create, get and delete.
fn objects_routes(prefix: &str, plural: &'static str) -> Router<Shared> {
    Router::new()
        .route(
            &format!("{prefix}/namespaces/{{namespace}}/{plural}"),
            axum::routing::post(
                move |State(cluster): State<Shared>,
                      Path(namespace): Path<String>,
                      Json(object): Json<Value>| {
                    create_object(plural, cluster, namespace, object)
                },
            ),
        )
        .route(
            &format!("{prefix}/namespaces/{{namespace}}/{plural}/{{name}}"),
            get(
                move |State(cluster): State<Shared>, Path((_, name)): Path<(String, String)>| {
                    get_object(plural, cluster, name)
                },
            )
            .delete(
                move |State(cluster): State<Shared>, Path((_, name)): Path<(String, String)>| {
                    delete_object(plural, cluster, name)
                },
            ),
        )
}

async fn list_pods(
    State(cluster): State<Shared>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let c = cluster.lock().unwrap();
    let items: Vec<Value> = c
        .pods
        .values()
        .filter(|p| selected(p, query.get("labelSelector")))
        .cloned()
        .collect();
    Json(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items})).into_response()
}

impl FakeKube {
    /// Serves on a loopback port until the test ends.
    pub async fn start() -> Self {
        let cluster: Shared = Arc::default();
        let app = Router::new()
            .route(
                "/apis/batch/v1/namespaces/{namespace}/jobs",
                get(list_jobs).post(create_job),
            )
            .route(
                "/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
                get(get_job).delete(delete_job).patch(patch_job),
            )
            .route("/api/v1/namespaces/{namespace}/pods", get(list_pods))
            .merge(objects_routes("/api/v1", "services"))
            .merge(objects_routes(
                "/apis/networking.k8s.io/v1",
                "networkpolicies",
            ))
            .route(
                "/api/v1/namespaces/{namespace}/secrets",
                axum::routing::post(create_secret),
            )
            .route(
                "/api/v1/namespaces/{namespace}/secrets/{name}",
                get(get_secret).put(replace_secret).delete(delete_secret),
            )
            .with_state(cluster.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeKube { url, cluster }
    }

    /// The API server URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kube client of this server, in `namespace`.
    pub fn client(&self, namespace: &str) -> kube::Client {
        vtp_launch::kubernetes::install_crypto_provider();
        let mut config = kube::Config::new(self.url.parse().unwrap());
        config.default_namespace = namespace.to_owned();
        kube::Client::try_from(config).unwrap()
    }

    /// A kubeconfig file for this server (for the backend binary).
    pub fn kubeconfig(&self, dir: &std::path::Path, namespace: &str) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
                self.url
            ),
        )
        .unwrap();
        path
    }

    /// Runs `kubelet` on every Job created from now on.
    pub fn run_pods_with(&self, kubelet: impl Fn(&Value) + Send + Sync + 'static) {
        self.cluster.lock().unwrap().kubelet = Some(Arc::new(kubelet));
    }

    /// Panics with what a kubelet said when it panicked (its failure is
    /// the test's).
    pub fn check_kubelet(&self) {
        let failures = self.cluster.lock().unwrap().kubelet_failures.clone();
        assert!(failures.is_empty(), "the fake kubelet failed: {failures:?}");
    }

    /// Records a kubelet's failure outside a request (in a thread that
    /// watches a pod), for [`FakeKube::check_kubelet`].
    pub fn kubelet_failed(&self, message: String) {
        self.cluster.lock().unwrap().kubelet_failures.push(message);
    }

    /// How many pages Job listings with a `limit` were served in.
    pub fn list_pages(&self) -> usize {
        self.cluster.lock().unwrap().list_pages
    }

    /// Lifts a Job's suspension, as Kueue does when it admits it.
    pub fn admit(&self, name: &str) {
        let mut c = self.cluster.lock().unwrap();
        let job = c.jobs.get_mut(name).expect("job exists");
        job["spec"]["suspend"] = json!(false);
    }

    /// The Job named `name`.
    pub fn job(&self, name: &str) -> Option<Value> {
        self.cluster.lock().unwrap().jobs.get(name).cloned()
    }

    /// The Secret named `name`.
    pub fn secret(&self, name: &str) -> Option<Value> {
        self.cluster.lock().unwrap().secrets.get(name).cloned()
    }

    /// The Service named `name`.
    pub fn service(&self, name: &str) -> Option<Value> {
        self.object("services", name)
    }

    /// The NetworkPolicy named `name`.
    pub fn network_policy(&self, name: &str) -> Option<Value> {
        self.object("networkpolicies", name)
    }

    fn object(&self, plural: &str, name: &str) -> Option<Value> {
        let c = self.cluster.lock().unwrap();
        c.objects.get(plural)?.get(name).cloned()
    }

    /// Names of the Jobs.
    pub fn job_names(&self) -> Vec<String> {
        self.cluster.lock().unwrap().jobs.keys().cloned().collect()
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.cluster.lock().unwrap().seen.clone()
    }

    /// Stores a Job as if someone else had created it.
    pub fn put_job(&self, job: Value) {
        let name = job["metadata"]["name"].as_str().unwrap().to_owned();
        self.cluster.lock().unwrap().jobs.insert(name, job);
    }

    /// Gives the Job a terminal condition (`Failed` / `Complete`).
    pub fn set_condition(&self, name: &str, kind: &str, reason: &str, message: &str) {
        let mut c = self.cluster.lock().unwrap();
        let job = c.jobs.get_mut(name).expect("job exists");
        job["status"] = json!({
            "failed": if kind == "Failed" { 1 } else { 0 },
            "conditions": [{
                "type": kind, "status": "True", "reason": reason, "message": message,
                "lastTransitionTime": "2020-01-01T00:00:00Z", "lastProbeTime": "2020-01-01T00:00:00Z"
            }]
        });
    }

    /// Removes a Job behind the launcher's back.
    pub fn vanish(&self, name: &str) {
        self.cluster.lock().unwrap().jobs.remove(name);
    }

    /// Adds a pod of the Job `job` with the given `status`.
    pub fn add_pod(&self, job: &str, pod: &str, status: Value) {
        let value = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "labels": {"job-name": job}},
            "status": status
        });
        self.cluster
            .lock()
            .unwrap()
            .pods
            .insert(pod.to_owned(), value);
    }
}
