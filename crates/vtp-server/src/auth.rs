//! Who is calling: the [`Caller`] extractor, per-job callback secrets, and
//! the ownership checks every route that takes an id goes through.
//!
//! - With [`AuthMode::Tokens`] a request needs `Authorization: Bearer vtp_…`
//!   (a token made with `vtp-backend token create`); it acts for the token's
//!   user, and sees another user's objects only with an admin token.
//! - With [`AuthMode::Off`] (loopback only, the embedded tier-1 default)
//!   every request acts for [`Principal::local`], which may use any
//!   `user_id`, as the seed's API did.
//!
//! Trainer reports never use tokens: each is signed with its job's secret
//! (see [`vtp_core::callback_signature`]), checked in the callback handler.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;

use axum::extract::{ConnectInfo, FromRequestParts, OptionalFromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use hashlink::LruCache;
use vtp_core::{
    BlobStoreExt, CallbackSecret, CredentialStoreExt, Error, Job, JobId, JobStore, Principal,
};

pub use vtp_core::auth::is_well_formed_token;

use crate::AppState;
use crate::error::ApiError;

/// Whether requests must carry an API token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// No tokens; one local user. Allowed only on a loopback address.
    Off,
    /// Every request but `/health`, `/metrics` and signed trainer reports
    /// needs a bearer token.
    Tokens,
}

impl AuthMode {
    /// The mode for `listen` when none is configured: off on loopback,
    /// tokens anywhere else.
    pub fn default_for(listen: std::net::SocketAddr) -> Self {
        if listen.ip().is_loopback() {
            AuthMode::Off
        } else {
            AuthMode::Tokens
        }
    }
}

/// The principal a request acts for.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if state.auth == AuthMode::Off {
            return Ok(Caller(Principal::local()));
        }
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| Error::unauthenticated("send Authorization: Bearer <token>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| {
                Error::unauthenticated("the Authorization header is not Bearer <token>")
            })?;
        // A token that cannot be one is refused without a database read, and
        // so is any from an address whose unknown tokens ran past its budget.
        if !vtp_core::auth::is_well_formed_token(token) {
            return Err(Error::unauthenticated("the token is not a VTP API token").into());
        }
        let client = client_ip(&parts.extensions);
        state.limits.check_lookup(client)?;
        match state.credentials.authenticate(token).await {
            Ok(principal) => Ok(Caller(principal)),
            Err(e @ Error::Unauthenticated { .. }) => {
                state.limits.lookup_failed(client);
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// `Option<Caller>`: the caller when the request carries valid credentials
/// (always, with authentication off), `None` otherwise, never a refusal.
impl OptionalFromRequestParts<AppState> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Option<Self>, Self::Rejection> {
        if state.auth == AuthMode::Tokens && !parts.headers.contains_key(AUTHORIZATION) {
            return Ok(None);
        }
        Ok(
            <Caller as FromRequestParts<AppState>>::from_request_parts(parts, state)
                .await
                .ok(),
        )
    }
}

/// The address a request came from (the connection's peer; unknown, as
/// `0.0.0.0`, where the router is driven without a listener, as in tests).
pub fn client_ip(extensions: &axum::http::Extensions) -> IpAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip())
}

/// The address a request came from, as an extractor (see [`client_ip`]).
#[derive(Debug, Clone, Copy)]
pub struct ConnectedFrom(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ConnectedFrom {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ConnectedFrom(client_ip(&parts.extensions)))
    }
}

impl Caller {
    /// The principal.
    pub fn principal(&self) -> &Principal {
        &self.0
    }

    /// Whether this caller may act for `user_id` (as an owner in a body or form).
    ///
    /// # Errors
    /// [`Error::Forbidden`] when it may not.
    pub fn check_acts_for(&self, field: &str, user_id: &str) -> vtp_core::Result<()> {
        if self.0.may_access(user_id) {
            Ok(())
        } else {
            Err(Error::forbidden(format!(
                "{field} {user_id:?} is not yours; leave it out or send your own ({:?})",
                self.0.user_id
            )))
        }
    }
}

/// Job `id`, if the caller may see it; someone else's job is answered
/// exactly like a missing one (404), so ids cannot be probed.
///
/// # Errors
/// [`Error::NotFound`]; store errors.
pub async fn owned_job(jobs: &dyn JobStore, caller: &Caller, id: JobId) -> Result<Job, ApiError> {
    let job = jobs.get(id).await?;
    // A job whose deletion was asked for is gone, for its owner too.
    if job.deleted_at.is_none() && caller.0.may_access(&job.user_id) {
        Ok(job)
    } else {
        Err(Error::not_found("job", id).into())
    }
}

/// Checks that `uri` names an object of `owner` in this backend's blob
/// store: under `users/{owner}/`, or under `jobs/{id}/` of a job `owner`
/// owns (a checkpoint to start from). With `datasets_only` it must be under
/// `users/{owner}/datasets/`.
///
/// # Errors
/// [`Error::InvalidInput`] naming `field`.
pub async fn check_owned_blob(
    state: &AppState,
    field: &str,
    uri: &str,
    owner: &str,
    datasets_only: bool,
) -> Result<(), ApiError> {
    let key = state
        .blobs
        .key_for(uri)
        .map_err(|e| Error::invalid(field, vtp_core::error_chain(&e)))?;
    use vtp_core::layout;
    let user_prefix = if datasets_only {
        layout::uploads_prefix(owner, layout::Upload::Dataset)
    } else {
        layout::user_prefix(owner)
    }
    .map_err(|e| Error::invalid(field, vtp_core::error_chain(&e)))?;
    if layout::is_below(&key, &user_prefix) {
        return Ok(());
    }
    if !datasets_only
        && let Some(id) = layout::job_of(&key)
        && let Ok(job) = state.jobs.get(id).await
        && job.user_id == owner
        && job.deleted_at.is_none()
    {
        return Ok(());
    }
    let what = if datasets_only {
        format!(
            "must be one of {owner}'s datasets (a key under {user_prefix}/, as uploads are stored)"
        )
    } else {
        format!(
            "must be {owner}'s own object (under {user_prefix}/ or a checkpoint of {owner}'s job)"
        )
    };
    Err(Error::invalid(field, format!("{uri} {what}")).into())
}

/// The callback secrets of recently started jobs, so a report is checked
/// without a database read; misses fall back to the store.
pub struct SecretCache {
    secrets: Mutex<LruCache<JobId, CallbackSecret>>,
}

impl std::fmt::Debug for SecretCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretCache").finish_non_exhaustive()
    }
}

impl Default for SecretCache {
    fn default() -> Self {
        SecretCache {
            secrets: Mutex::new(LruCache::new(4096)),
        }
    }
}

impl SecretCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<JobId, CallbackSecret>> {
        self.secrets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers the secret of `id`.
    pub fn remember(&self, id: JobId, secret: CallbackSecret) {
        self.lock().insert(id, secret);
    }

    /// The secret of `id` if cached.
    pub fn get(&self, id: JobId) -> Option<CallbackSecret> {
        self.lock().get(&id).cloned()
    }
}

/// The current callback secret of job `id`: cached, else from the store.
///
/// # Errors
/// [`Error::Unauthenticated`] when the job has none (never started, or
/// unknown); store errors.
pub async fn job_secret(
    state: &AppState,
    id: JobId,
    client: IpAddr,
) -> Result<CallbackSecret, ApiError> {
    if let Some(secret) = state.secrets.get(id) {
        return Ok(secret);
    }
    state.limits.check_lookup(client)?;
    let Some(secret) = state.credentials.job_secret(id).await? else {
        state.limits.lookup_failed(client);
        return Err(Error::unauthenticated(format!("job {id} has no callback secret")).into());
    };
    state.secrets.remember(id, secret.clone());
    Ok(secret)
}
