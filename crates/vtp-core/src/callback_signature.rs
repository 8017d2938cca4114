//! Signed trainer reports, the [Standard Webhooks] way.
//!
//! The backend makes a [`CallbackSecret`] per job at launch and hands it to
//! the trainer; every report carries
//!
//! - `webhook-id`: a unique id of the delivery (the same on every retry),
//! - `webhook-timestamp`: Unix seconds when it was signed,
//! - `webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`
//!   (several space-separated signatures are allowed, for key rotation).
//!
//! The backend checks the raw body against the job's own secret in constant
//! time and refuses a timestamp more than [`TOLERANCE`] away from its clock.
//!
//! Why not the `standardwebhooks` crate: its `verify` compares signatures
//! with `zip`, which stops at the shorter one, so an empty or truncated
//! signature (`v1,`) passes. Signing here is the spec's few lines on
//! RustCrypto's `hmac`, and verifying uses `Mac::verify_slice`, which
//! compares the whole tag in constant time (see the test vector below, taken
//! from the spec's reference libraries).
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{Error, Result};

/// Header with the delivery id.
pub const HEADER_ID: &str = "webhook-id";
/// Header with the signing time, Unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header with the signature(s).
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// How far a signature's timestamp may be from the verifier's clock.
pub const TOLERANCE: Duration = Duration::from_secs(5 * 60);

const SECRET_PREFIX: &str = "whsec_";

type HmacSha256 = hmac::Hmac<Sha256>;

/// A job's callback signing secret, `whsec_<base64 of 32 random bytes>`.
/// `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, format = Password)]
pub struct CallbackSecret(String);

impl fmt::Debug for CallbackSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallbackSecret(<redacted>)")
    }
}

impl CallbackSecret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        let key: [u8; 32] = rand::rng().random();
        CallbackSecret(format!("{SECRET_PREFIX}{}", BASE64.encode(key)))
    }

    /// Wraps a secret as stored or received.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] unless it is `whsec_` and base64 of at least 24 bytes.
    pub fn parse(secret: impl Into<String>) -> Result<Self> {
        let secret = CallbackSecret(secret.into());
        let key = secret.key()?;
        if key.len() < 24 {
            return Err(Error::invalid(
                "callback_secret",
                "must hold at least 24 bytes",
            ));
        }
        Ok(secret)
    }

    /// The secret as text, for storing and handing to the trainer.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn key(&self) -> Result<Vec<u8>> {
        let encoded = self.0.strip_prefix(SECRET_PREFIX).ok_or_else(|| {
            Error::invalid(
                "callback_secret",
                format!("must start with {SECRET_PREFIX}"),
            )
        })?;
        BASE64
            .decode(encoded)
            .map_err(|e| Error::invalid("callback_secret", format!("not base64: {e}")))
    }

    fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<HmacSha256> {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.key()?)
            .map_err(|e| Error::internal(format!("hmac key: {e}")))?;
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        Ok(mac)
    }

    /// The `webhook-signature` value for a delivery: `v1,<base64>`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a malformed secret.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String> {
        let tag = self.mac(msg_id, timestamp, body)?.finalize().into_bytes();
        Ok(format!("v1,{}", BASE64.encode(tag)))
    }

    /// The three headers of a delivery signed now.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a malformed secret.
    pub fn headers(&self, msg_id: &str, body: &[u8]) -> Result<[(&'static str, String); 3]> {
        let timestamp = chrono::Utc::now().timestamp();
        Ok([
            (HEADER_ID, msg_id.to_owned()),
            (HEADER_TIMESTAMP, timestamp.to_string()),
            (HEADER_SIGNATURE, self.sign(msg_id, timestamp, body)?),
        ])
    }

    /// Checks a delivery's headers against `body`, with `now` as Unix seconds.
    ///
    /// # Errors
    /// [`Error::Unauthenticated`] naming what is wrong: a missing header, a
    /// timestamp outside [`TOLERANCE`], or no matching `v1` signature.
    pub fn verify(&self, headers: &http::HeaderMap, body: &[u8], now: i64) -> Result<()> {
        let signed = precheck(headers, now)?;
        let mac = self.mac(signed.msg_id, signed.timestamp, body)?;
        let matched = signed
            .tags()
            .any(|tag| mac.clone().verify_slice(&tag).is_ok());
        if matched {
            Ok(())
        } else {
            Err(Error::unauthenticated(
                "the report's signature does not match",
            ))
        }
    }
}

/// The signature headers of a report, checked for form and freshness.
#[derive(Debug, Clone, Copy)]
pub struct SignedHeaders<'a> {
    msg_id: &'a str,
    timestamp: i64,
    signatures: &'a str,
}

impl SignedHeaders<'_> {
    /// The decoded `v1` tags of the right length.
    fn tags(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.signatures
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|s| BASE64.decode(s).ok())
            .filter(|tag| tag.len() == 32)
    }
}

/// Checks what can be checked of a report's signature without its job's
/// secret: the three headers are there, the timestamp is within
/// [`TOLERANCE`] of `now`, and at least one signature is a `v1` HMAC-SHA256
/// tag. The backend does this before it looks the secret up, so a report
/// that could never verify costs no database read.
///
/// # Errors
/// [`Error::Unauthenticated`] naming what is wrong.
pub fn precheck(headers: &http::HeaderMap, now: i64) -> Result<SignedHeaders<'_>> {
    let header = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::unauthenticated(format!("missing or unreadable {name} header")))
    };
    let msg_id = header(HEADER_ID)?;
    let timestamp: i64 = header(HEADER_TIMESTAMP)?
        .parse()
        .map_err(|_| Error::unauthenticated(format!("{HEADER_TIMESTAMP} is not an integer")))?;
    let signatures = header(HEADER_SIGNATURE)?;
    let tolerance = TOLERANCE.as_secs();
    // abs_diff: a timestamp near i64::MIN must not overflow (found by
    // the callback fuzz target; fuzz/regressions/callback).
    let skew = now.abs_diff(timestamp);
    if skew > tolerance {
        return Err(Error::unauthenticated(format!(
            "{HEADER_TIMESTAMP} is {skew}s away from the server's clock (at most {tolerance}s allowed)"
        )));
    }
    let signed = SignedHeaders {
        msg_id,
        timestamp,
        signatures,
    };
    if signed.tags().next().is_none() {
        return Err(Error::unauthenticated(
            "the report carries no v1 HMAC-SHA256 signature",
        ));
    }
    Ok(signed)
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::*;

    fn headers(id: &str, timestamp: i64, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_ID, HeaderValue::from_str(id).unwrap());
        headers.insert(HEADER_TIMESTAMP, HeaderValue::from(timestamp));
        headers.insert(HEADER_SIGNATURE, HeaderValue::from_str(signature).unwrap());
        headers
    }

    #[test]
    fn signs_the_spec_test_vector() {
        let secret = CallbackSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        assert_eq!(
            secret
                .sign("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1_649_367_553, body)
                .unwrap(),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn verifies_only_whole_fresh_signatures_of_the_same_body() {
        let secret = CallbackSecret::generate();
        let other = CallbackSecret::generate();
        let body = br#"{"status":"running","seq":1}"#;
        let now = 1_700_000_000;
        let good = secret.sign("job-1", now, body).unwrap();
        secret
            .verify(&headers("job-1", now, &good), body, now)
            .unwrap();
        secret
            .verify(
                &headers("job-1", now, &format!("v1,AAAA {good}")),
                body,
                now,
            )
            .unwrap();

        let refused = |h: HeaderMap, b: &[u8], at: i64| {
            let err = secret.verify(&h, b, at).unwrap_err();
            assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
        };
        // Another body, another id, another job's secret.
        refused(headers("job-1", now, &good), br#"{"status":"failed"}"#, now);
        refused(headers("job-2", now, &good), body, now);
        let forged = other.sign("job-1", now, body).unwrap();
        refused(headers("job-1", now, &forged), body, now);
        // Truncated and empty signatures (what `zip`-based compares accept).
        refused(headers("job-1", now, "v1,"), body, now);
        refused(headers("job-1", now, &good[..good.len() - 8]), body, now);
        refused(headers("job-1", now, "v2,abc"), body, now);
        // Six minutes old, or six minutes ahead.
        refused(headers("job-1", now, &good), body, now + 360);
        refused(headers("job-1", now, &good), body, now - 360);
        // Missing headers.
        let mut missing = headers("job-1", now, &good);
        missing.remove(HEADER_SIGNATURE);
        refused(missing, body, now);
    }

    #[test]
    fn secrets_are_random_and_hidden() {
        let a = CallbackSecret::generate();
        assert_ne!(a, CallbackSecret::generate());
        assert!(!format!("{a:?}").contains(a.expose()));
        assert_eq!(CallbackSecret::parse(a.expose()).unwrap(), a);
        assert!(CallbackSecret::parse("whsec_c2hvcnQ=").is_err());
        assert!(CallbackSecret::parse("plain").is_err());
    }
}
