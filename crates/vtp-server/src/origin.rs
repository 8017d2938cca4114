//! Who may talk to a backend running without authentication: this machine's
//! own programs, not the web pages its user opens.
//!
//! With `VTP_AUTH=off` the backend listens on loopback and trusts every
//! request. A page on any site can still make the browser send requests to
//! `127.0.0.1` (a form post: cross-site request forgery), and a site whose
//! name its owner points at `127.0.0.1` can even read the answers (DNS
//! rebinding). So, with authentication off:
//!
//! - the `Host` a request names must be this machine's (`localhost`,
//!   `127.0.0.1`, `[::1]`, a `*.localhost` name) or the host of the
//!   backend's public URL: a rebinding page's requests name its own site;
//! - a request that changes something (not `GET`, `HEAD` or `OPTIONS`) and
//!   carries an `Origin` (every browser request of that kind does) must
//!   come from the backend's own origin (its dashboard): a page elsewhere
//!   is refused.
//!
//! JSON bodies must also say they are JSON ([`vtp_http::ApiJson`]), which a
//! page cannot send another site without the browser asking that site
//! first. Programs (curl, the CLI, Python) send no `Origin` and are served.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::auth::AuthMode;
use crate::error::ApiError;

/// The host part of an authority (`host[:port]`, `[v6]:port`), lowercased.
fn host_of(authority: &str) -> String {
    let authority = authority.trim().to_ascii_lowercase();
    if let Some(rest) = authority.strip_prefix('[') {
        return rest
            .split(']')
            .next()
            .map(|h| format!("[{h}]"))
            .unwrap_or_default();
    }
    authority
        .rsplit_once(':')
        .map_or(authority.clone(), |(host, _)| host.to_owned())
}

/// Whether `host` names this machine.
fn is_local(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn refused(message: String) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden_origin", message).into_response()
}

/// The middleware: with authentication off, refuses requests that name
/// another host or come from another origin (see the module).
pub async fn local_only(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.auth != AuthMode::Off {
        return next.run(request).await;
    }
    let public_host = url::Url::parse(&state.public_url)
        .ok()
        .and_then(|url| url.host_str().map(str::to_ascii_lowercase));
    let allowed = |host: &str| is_local(host) || public_host.as_deref() == Some(host);
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()));
    if let Some(host) = &host
        && !allowed(&host_of(host))
    {
        tracing::warn!(%host, "refused a request for another host (authentication is off)");
        return refused(format!(
            "this backend runs without authentication and answers only requests for this machine, not for {host:?}"
        ));
    }
    let changes = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if changes && let Some(origin) = request.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        let same = url::Url::parse(origin).ok().is_some_and(|url| {
            let authority = match (url.host_str(), url.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_owned(),
                _ => return false,
            };
            host.as_deref()
                .is_some_and(|host| host.eq_ignore_ascii_case(&authority))
                && allowed(&host_of(&authority))
        });
        if !same {
            tracing::warn!(%origin, "refused a request from a web page of another origin (authentication is off)");
            return refused(format!(
                "this backend runs without authentication and takes changes only from its own pages, not from {origin}"
            ));
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_parsed_and_judged() {
        assert_eq!(host_of("127.0.0.1:8000"), "127.0.0.1");
        assert_eq!(host_of("LocalHost"), "localhost");
        assert_eq!(host_of("[::1]:8000"), "[::1]");
        assert_eq!(host_of("evil.example:8000"), "evil.example");
        for local in [
            "localhost",
            "127.0.0.1",
            "127.1.2.3",
            "[::1]",
            "app.localhost",
        ] {
            assert!(is_local(local), "{local}");
        }
        for other in [
            "evil.example",
            "localhost.evil.example",
            "10.0.0.1",
            "0.0.0.0",
        ] {
            assert!(!is_local(other), "{other}");
        }
    }
}
