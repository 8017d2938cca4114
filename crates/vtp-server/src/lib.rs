//! # vtp-server
//!
//! The backend API of VTP as a library: [`app`] builds the axum router over
//! an [`AppState`] (a [`JobStore`], a [`BlobStore`] and a
//! [`TrainerLauncher`]); the `vtp-backend` binary is a thin shell that reads
//! [`BackendConfig`] and calls [`serve`].
//!
//! Routes: the seed's REST shapes, described by the OpenAPI 3.1 document
//! the router itself generates ([`openapi::document`]); a running backend
//! serves it at `/openapi.json` and renders it at `/docs`, and a copy is
//! committed at `docs/openapi.json`.
//!
//! With [`AuthMode::Tokens`] every route but `/health`, `/metrics` and the
//! callback needs `Authorization: Bearer <token>` and acts for the token's
//! user (see [`auth`]); callbacks are signed per job.
#![warn(missing_docs)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;
use vtp_core::{BlobStore, CredentialStore, JobStore, LeaderElector, TrainerLauncher};
use vtp_storage::Stores;

pub mod auth;
pub mod config;
/// The error answer and extractors, shared with the trainer service.
pub use vtp_http::error;
pub mod events;
mod known_jobs;
pub mod leader;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod origin;
pub mod probe;
pub mod queue;
pub mod retention;
mod routes;
pub mod sweeper;
pub mod ui;

pub use auth::{AuthMode, Caller};
pub use config::{BackendConfig, LauncherKind};
pub use error::{ApiError, ApiJson};
pub use known_jobs::KnownJobs;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Where jobs and metrics live.
    pub jobs: Arc<dyn JobStore>,
    /// API token hashes and per-job callback secrets (the jobs' database).
    pub credentials: Arc<dyn CredentialStore>,
    /// Whether requests need a token.
    pub auth: AuthMode,
    /// Where datasets and checkpoints live.
    pub blobs: Arc<dyn BlobStore>,
    /// How trainers are started and stopped.
    pub launcher: Arc<dyn TrainerLauncher>,
    /// Base URL trainers call back on (`http://127.0.0.1:8000`).
    pub public_url: String,
    /// Largest dataset upload, in bytes.
    pub max_upload_bytes: u64,
    /// Whether jobs may run their owner's own code (`framework: "python"`,
    /// `VTP_ALLOW_USER_CODE`).
    pub allow_user_code: bool,
    /// The last stored version of jobs that trainers report on.
    pub known_jobs: Arc<KnownJobs>,
    /// Callback secrets of recently started jobs.
    pub secrets: Arc<auth::SecretCache>,
    /// Per-user rates and caps.
    pub limits: Arc<limits::Limits>,
    /// How often trainers report at least (`VTP_HEARTBEAT_SECS`, passed on
    /// in every start request); a running job silent for
    /// [`vtp_core::launcher::LEASE_HEARTBEATS`] periods has lost its runner.
    pub heartbeat: Duration,
    /// Jobs this process just changed, announced by the store behind
    /// [`AppState::jobs`] on every write (a report, a start, a cancel, the
    /// sweeper, the dispatcher): wakes their event feeds at once. Feeds
    /// also poll the store, for changes made by other replicas.
    pub changes: tokio::sync::broadcast::Sender<vtp_core::JobId>,
    /// Wakes the queue's dispatcher: a job was started, or a slot freed.
    pub dispatch: Arc<tokio::sync::Notify>,
    /// Start requests' trace contexts, which first launches continue.
    pub start_traces: Arc<queue::StartTraces>,
    /// The shared event feed of each watched job.
    pub feeds: Arc<events::Feeds>,
    /// Who of the backends sharing the database leads.
    pub leader: Arc<dyn LeaderElector>,
    /// The store as last read for `/health` and `/metrics`.
    pub probe: Arc<probe::Probe>,
    /// Cancelled when the server shuts down: ends event streams.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The leader's duties: the sweeper's limits, the dispatcher's,
    /// retention's.
    pub duties: leader::Duties,
}

impl AppState {
    /// State with the default upload limit and authentication off (set it
    /// with [`AppState::with_auth`]).
    pub fn new(
        stores: Stores,
        blobs: Arc<dyn BlobStore>,
        launcher: Arc<dyn TrainerLauncher>,
        public_url: impl Into<String>,
    ) -> Self {
        let changes = tokio::sync::broadcast::channel(1024).0;
        let dispatch = Arc::new(tokio::sync::Notify::new());
        let jobs: Arc<dyn JobStore> = Arc::new(metrics::ObservedJobStore {
            inner: stores.jobs,
            changes: changes.clone(),
            dispatch: dispatch.clone(),
        });
        let heartbeat = Duration::from_secs(vtp_core::launcher::DEFAULT_HEARTBEAT_SECS);
        AppState {
            feeds: Arc::new(events::Feeds::new(jobs.clone(), changes.clone())),
            jobs,
            dispatch,
            start_traces: Arc::default(),
            leader: stores.leader,
            probe: Arc::new(probe::Probe::default()),
            shutdown: tokio_util::sync::CancellationToken::new(),
            duties: leader::Duties {
                sweep: sweeper::SweepPolicy::new(Duration::from_secs(3600), heartbeat),
                queue: queue::Policy::default(),
                reconcile_every: Duration::from_secs(10),
                retention: retention::Policy::default(),
            },
            credentials: stores.credentials,
            auth: AuthMode::Off,
            blobs,
            launcher,
            public_url: public_url.into().trim_end_matches('/').to_owned(),
            max_upload_bytes: 10 * 1024 * 1024 * 1024,
            allow_user_code: false,
            known_jobs: Arc::new(KnownJobs::new()),
            secrets: Arc::new(auth::SecretCache::default()),
            limits: Arc::new(limits::Limits::new(limits::LimitSettings::default())),
            heartbeat,
            changes,
        }
    }

    /// Sets the heartbeat period trainers keep (and so the sweeper's lease).
    #[must_use]
    pub fn with_heartbeat(mut self, period: Duration) -> Self {
        self.heartbeat = period.max(Duration::from_secs(1));
        self.duties.sweep =
            sweeper::SweepPolicy::new(self.duties.sweep.stale_after, self.heartbeat);
        self
    }

    /// Sets how long a launched job may take to start before its runner is
    /// taken for lost (`VTP_STALE_AFTER_SECS`).
    #[must_use]
    pub fn with_stale_after(mut self, stale_after: Duration) -> Self {
        self.duties.sweep = sweeper::SweepPolicy::new(stale_after, self.heartbeat);
        self
    }

    /// Sets the leader's duties (sweeper, dispatcher, reconciler, retention).
    #[must_use]
    pub fn with_duties(mut self, duties: leader::Duties) -> Self {
        self.duties = duties;
        self
    }

    /// Sets the per-user limits.
    #[must_use]
    pub fn with_limits(mut self, settings: limits::LimitSettings) -> Self {
        self.limits = Arc::new(limits::Limits::new(settings));
        self
    }

    /// Sets whether requests need a token.
    #[must_use]
    pub fn with_auth(mut self, auth: AuthMode) -> Self {
        self.auth = auth;
        self
    }

    /// Lets jobs run their owner's own code (`framework: "python"`).
    #[must_use]
    pub fn with_user_code(mut self, allowed: bool) -> Self {
        self.allow_user_code = allowed;
        self
    }

    /// Sets the upload limit.
    #[must_use]
    pub fn with_max_upload_bytes(mut self, limit: u64) -> Self {
        self.max_upload_bytes = limit;
        self
    }

    /// The callback URL of a job.
    pub fn callback_url(&self, job_id: vtp_core::JobId) -> String {
        format!("{}/training/jobs/{job_id}/callback", self.public_url)
    }

    /// A job as the API answers with it: with its `callback_url`.
    pub fn present(&self, mut job: vtp_core::Job) -> vtp_core::Job {
        job.callback_url = Some(self.callback_url(job.id));
        job
    }

    /// Jobs as the API answers with them: with their `callback_url` and,
    /// for those waiting for capacity, their place in the queue (a read of
    /// the queue, made only when one of them waits).
    pub async fn present_all(&self, jobs: Vec<vtp_core::Job>) -> Vec<vtp_core::Job> {
        let mut places = std::collections::HashMap::new();
        if let Some(first) = jobs.iter().find(|job| job.is_waiting()) {
            let one_owner = jobs
                .iter()
                .filter(|job| job.is_waiting())
                .all(|job| job.user_id == first.user_id);
            let owner = one_owner.then_some(first.user_id.as_str());
            match self.jobs.queue_positions(owner).await {
                Ok(found) => places = found,
                Err(e) => {
                    tracing::warn!(error = %error::error_chain(&e), "cannot read the queue's order; places left out")
                }
            }
        }
        jobs.into_iter()
            .map(|mut job| {
                job.queue_position = places.get(&job.id).copied();
                self.present(job)
            })
            .collect()
    }

    /// One job as the API answers with it (see [`AppState::present_all`]).
    pub async fn present_one(&self, job: vtp_core::Job) -> vtp_core::Job {
        self.present_all(vec![job])
            .await
            .pop()
            .expect("one job in, one out")
    }

    /// After a launch of `job_id`: when the job was cancelled (or ended)
    /// while the launch was under way, the cancel found no runner to stop,
    /// so the one the launch started is stopped now.
    pub async fn stop_if_ended_during_launch(&self, job_id: vtp_core::JobId) {
        let Ok(job) = self.jobs.get(job_id).await else {
            return;
        };
        if job.status.is_terminal() || job.status == vtp_core::JobStatus::Cancelling {
            tracing::info!(%job_id, status = %job.status, "the job ended or was cancelled during its launch; stopping the runner");
            if let Err(e) = self.launcher.cancel(job_id).await {
                tracing::warn!(%job_id, error = %error::error_chain(&e), "could not stop the runner the launch started");
            }
        }
    }

    /// The start request of the job's current attempt: its callback URL and
    /// secret, the checkpoint set to resume from, the heartbeat to keep.
    pub fn start_request(
        &self,
        job: &vtp_core::Job,
        secret: vtp_core::CallbackSecret,
    ) -> vtp_core::StartTraining {
        vtp_core::StartTraining::for_job(job, self.callback_url(job.id))
            .with_secret(secret)
            .with_heartbeat(self.heartbeat)
    }

    /// Hands the job's current attempt to the launcher, in a `launch` span
    /// whose trace context the start request carries (`traceparent`), so
    /// the trainer's spans for the attempt join the trace this launch is
    /// part of: the user's start request's (a first launch on the replica
    /// that took the request, [`queue::StartTraces`]), or a relaunch's own.
    ///
    /// # Errors
    /// The launcher's.
    pub async fn launch(
        &self,
        job: &vtp_core::Job,
        secret: vtp_core::CallbackSecret,
    ) -> vtp_core::Result<()> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "launch",
            job_id = %job.id,
            attempt = job.attempt.max(1),
            launcher = self.launcher.name()
        );
        if job.attempt <= 1 {
            vtp_http::telemetry::set_parent(&span, self.start_traces.get(job.id).as_deref());
        }
        let mut request = self.start_request(job, secret);
        request.traceparent = vtp_http::telemetry::traceparent(&span);
        // The archive's size, for launchers that size a trainer's disk.
        use vtp_core::BlobStoreExt as _;
        request.dataset_bytes = match self.blobs.key_for(&job.dataset_s3_uri) {
            Ok(key) => self.blobs.head(&key).await.ok().map(|meta| meta.size),
            Err(_) => None,
        };
        self.launcher.launch(&request).instrument(span).await
    }
}

/// How long a non-streaming request may take before it is answered 503.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Every route with its OpenAPI operation, so that nothing is served
/// undocumented: [`app`] serves the router, [`openapi::document`] the
/// document.
pub(crate) fn routes_with_docs() -> OpenApiRouter<AppState> {
    use utoipa::OpenApi as _;
    let bounded = OpenApiRouter::with_openapi(openapi::BackendApi::openapi())
        .routes(routes!(routes::health))
        .routes(routes!(routes::jobs::create, routes::jobs::list))
        .routes(routes!(routes::jobs::get, routes::jobs::cancel))
        .routes(routes!(routes::datasets::delete))
        .routes(routes!(routes::jobs::launch::start))
        .routes(routes!(routes::jobs::reports::callback))
        .routes(routes!(routes::jobs::reports::metrics))
        .route_layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ));
    let streaming = OpenApiRouter::new()
        .routes(routes!(routes::jobs::reports::events))
        .routes(routes!(routes::jobs::checkpoints::checkpoint))
        .routes(routes!(routes::jobs::checkpoints::checkpoint_file))
        // The upload handler bounds the body itself while streaming it:
        // its size, each part's header section, its pace and its length.
        .routes(routes!(routes::datasets::upload).layer(DefaultBodyLimit::disable()))
        .routes(routes!(routes::datasets::upload_code).layer(DefaultBodyLimit::disable()));
    bounded
        .merge(streaming)
        .route_layer(axum::middleware::from_fn(metrics::track))
        .routes(routes!(metrics::render))
}

/// `/openapi.json`, and Swagger UI rendering it at `/docs`.
#[cfg(feature = "swagger-ui")]
fn api_docs<S: Clone + Send + Sync + 'static>(document: serde_json::Value) -> Router<S> {
    utoipa_swagger_ui::SwaggerUi::new("/docs")
        .external_url_unchecked("/openapi.json", document)
        .into()
}

/// `/openapi.json` only: this build has no Swagger UI (the main job's
/// leaves it out).
#[cfg(not(feature = "swagger-ui"))]
fn api_docs<S: Clone + Send + Sync + 'static>(document: serde_json::Value) -> Router<S> {
    let body = document.to_string();
    Router::new().route(
        "/openapi.json",
        axum::routing::get(move || {
            std::future::ready((
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body.clone(),
            ))
        }),
    )
}

/// The backend router.
///
/// Every answer carries `x-request-id` (the client's, or a fresh UUID);
/// the request's log lines carry it too. Non-streaming routes time out after
/// [`REQUEST_TIMEOUT`]; uploads and checkpoint downloads stream for as long
/// as they need. `/openapi.json` is the API's OpenAPI document and `/docs`
/// renders it (Swagger UI, built into the binary with the `swagger-ui`
/// feature).
pub fn app(state: AppState) -> Router {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    // Install the recorder before the first request records anything.
    metrics::handle();
    let (router, document) = routes_with_docs().split_for_parts();
    router
        .merge(api_docs(openapi::served_json(&document)))
        .merge(ui::router())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            origin::local_only,
        ))
        .layer(axum::middleware::from_fn(error::hide_server_errors))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
                let id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let span = tracing::info_span!(
                    "request",
                    method = %request.method(),
                    uri = %request.uri().path(),
                    request_id = %id,
                    job_id = tracing::field::Empty,
                );
                // A request that names a trace (a trainer's report) joins it.
                vtp_http::telemetry::set_parent_from_headers(&span, request.headers());
                // Every line about a job carries its id.
                if let Some(job_id) = job_id_in_path(request.uri().path()) {
                    span.record("job_id", tracing::field::display(job_id));
                }
                span
            }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

pub use vtp_http::{init_tracing, parent_exited, shutdown_signal};

/// The job a request is about: the id after `/training/jobs/` (under
/// whatever prefix the router is mounted).
fn job_id_in_path(path: &str) -> Option<vtp_core::JobId> {
    let (_, rest) = path.split_once("/training/jobs/")?;
    rest.split('/').next()?.parse().ok()
}

/// A crash point: with the `failpoints` feature and the fail point `name`
/// set to `return` (`FAILPOINTS=name=return`), the request holds here for
/// good, without blocking its thread (a blocked runtime thread can stall
/// the whole server), until the crash tests SIGKILL the process; otherwise
/// it does nothing.
pub(crate) async fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        fn set(name: &str) -> bool {
            fail::fail_point!(name, |_| true);
            false
        }
        if set(name) {
            tracing::warn!(
                point = name,
                "fail point: holding this request until the process dies"
            );
            std::future::pending::<()>().await;
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Re-adopts, relaunches or puts back to wait the jobs a runner held (or
/// should have held) under an earlier run of the backend or an earlier
/// leader: a job its launcher still runs is kept; a launched `queued` one
/// it does not is put back to wait (its launch was lost with the backend,
/// so no runner was ever confirmed; the dispatcher launches the same
/// attempt again); a running one it does not has lost its runner, so its
/// attempt ends ([`vtp_core::JobStoreExt::end_attempt`]): back to wait
/// while attempts are left (resuming from its last checkpoint set), else
/// failed with the reason; a job being cancelled is cancelled. Jobs whose
/// trainer cannot be asked are left to the sweeper. Jobs waiting for
/// capacity are not looked at. The jobs are read a page at a time.
///
/// # Errors
/// Store errors while listing.
pub async fn recover(state: &AppState) -> vtp_core::Result<(usize, usize)> {
    use vtp_core::JobStoreExt;
    let (mut adopted, mut ended) = (0, 0);
    for mut pages in
        vtp_core::JobPages::launched(state.jobs.as_ref(), vtp_core::JobFilter::MAX_LIMIT)
    {
        while let Some(page) = pages.next().await? {
            for job in page {
                let status = job.status;
                match state.launcher.is_running(job.id).await {
                    Ok(true) => {
                        tracing::info!(job_id = %job.id, %status, "re-adopted a job after restart");
                        adopted += 1;
                    }
                    Ok(false) if status == vtp_core::JobStatus::Queued => {
                        tracing::info!(job_id = %job.id, "a launched job no trainer holds; it waits to be launched again");
                        queue::unlaunch(state, job.id, job.attempt, Duration::ZERO).await;
                    }
                    Ok(false) => {
                        let reason = format!(
                            "the backend restarted and its {} trainer no longer runs the job",
                            state.launcher.name()
                        );
                        // One job the store cannot update now is left to the
                        // sweeper; the others are still recovered.
                        match state.jobs.end_attempt(job.id, job.attempt, &reason).await {
                            Ok(job) => {
                                tracing::warn!(job_id = %job.id, from = %status, to = %job.status, %reason, "a job lost its runner");
                                ended += 1;
                            }
                            Err(e) => {
                                tracing::warn!(job_id = %job.id, error = %error::error_chain(&e), "could not end the lost attempt; the sweeper will decide");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(job_id = %job.id, error = %error::error_chain(&e), "cannot ask the trainer; the sweeper will decide")
                    }
                }
            }
        }
    }
    Ok((adopted, ended))
}

/// Serves the backend on `listener` until `shutdown` resolves: the routes
/// (through [`vtp_http::serve()`], with its header-read timeout and
/// connection cap), the store probe behind `/health`, and the race for
/// leadership with the leader's duties ([`leader`]: recovery, the queue's
/// dispatcher, the sweeper, the launcher's reconciler, retention). On
/// shutdown event streams end, so open connections finish promptly.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, vtp_http::ServeOptions::default(), shutdown).await
}

/// [`serve`] with the accept loop's bounds set (header-read timeout,
/// connections).
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AppState,
    options: vtp_http::ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(leader::run(state.clone(), state.duties));
    tasks.spawn(probe::run(state.clone()));
    let streams = state.shutdown.clone();
    let result = vtp_http::serve(listener, app(state), options, async move {
        shutdown.await;
        streams.cancel();
    })
    .await;
    tasks.abort_all();
    result
}
