//! https clients that trust the deployment's private CA
//! ([`vtp_core::tls::CA_CERT_ENV`], `VTP_CA_CERT`) besides the system's
//! roots: the backend client, the trainer's reports, the HTTP launcher, the
//! CLI and the Python client all build theirs here.
//!
//! https is the `tls` feature (on by default). A build without it (the main
//! job's, which talks only to loopback and so compiles no TLS provider)
//! speaks http only: [`require_for`] refuses an https URL and
//! [`trust_ca_file`] a CA bundle, each with an error naming the feature,
//! rather than a connection that fails later with a transport error.

use std::path::Path;

use vtp_core::{Error, Result};

/// Whether this build speaks https (the `tls` feature).
pub const ENABLED: bool = cfg!(feature = "tls");

/// Refuses `url` (the setting `field`) when it is https and this build has
/// no TLS.
///
/// # Errors
/// [`Error::InvalidInput`] naming `field` for an https URL without the `tls`
/// feature.
pub fn require_for(field: &str, url: &url::Url) -> Result<()> {
    if url.scheme() == "https" && !ENABLED {
        return Err(no_tls(field, &format!("{url} is https")));
    }
    Ok(())
}

fn no_tls(field: &str, what: &str) -> Error {
    Error::invalid(
        field,
        format!(
            "{what}, but this build speaks http only: rebuild with the `tls` feature \
             (the default; the main job's loopback build leaves it out)"
        ),
    )
}

/// `builder`, trusting the certificates of the PEM bundle at `path` as well
/// as the system's roots.
///
/// # Errors
/// [`Error::InvalidInput`] naming `field` when the file cannot be read or
/// holds no PEM certificate bundle, or when this build has no TLS.
pub fn trust_ca_file(
    builder: reqwest::ClientBuilder,
    field: &str,
    path: &Path,
) -> Result<reqwest::ClientBuilder> {
    let pem = vtp_core::tls::read_ca_bundle(field, path)?;
    #[cfg(feature = "tls")]
    {
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| Error::invalid(field, format!("not a PEM certificate bundle: {e}")))?;
        Ok(builder.tls_certs_merge(certs))
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = (builder, pem);
        Err(no_tls(field, "a CA bundle is set"))
    }
}

/// A client builder trusting `VTP_CA_CERT` when it is set.
///
/// # Errors
/// [`Error::InvalidInput`] naming `VTP_CA_CERT` when it names no readable
/// certificate bundle, or when it is set and this build has no TLS.
pub fn client_builder() -> Result<reqwest::ClientBuilder> {
    let builder = reqwest::Client::builder();
    match std::env::var_os(vtp_core::tls::CA_CERT_ENV).filter(|v| !v.is_empty()) {
        Some(path) => trust_ca_file(builder, vtp_core::tls::CA_CERT_ENV, Path::new(&path)),
        None => Ok(builder),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_always_spoken_and_https_only_with_the_feature() {
        let http = url::Url::parse("http://127.0.0.1:8000/").unwrap();
        require_for("url", &http).unwrap();
        let https = url::Url::parse("https://vtp.example/").unwrap();
        let refused = require_for("url", &https).err();
        assert_eq!(refused.is_some(), !ENABLED, "refused exactly without TLS");
        if let Some(err) = refused {
            let text = err.to_string();
            assert!(text.contains("`tls` feature"), "{text}");
            assert!(text.contains("https://vtp.example/"), "{text}");
        }
    }

    /// The http-only build (`cargo test -p vtp-client --no-default-features`,
    /// a step of the test command) refuses a CA bundle where it is named.
    #[cfg(not(feature = "tls"))]
    #[test]
    fn a_ca_bundle_is_refused_without_tls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = trust_ca_file(reqwest::Client::builder(), "ca_cert", &path).unwrap_err();
        match &err {
            Error::InvalidInput { field, .. } => assert_eq!(field, "ca_cert"),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("`tls` feature"), "{err}");
    }
}
