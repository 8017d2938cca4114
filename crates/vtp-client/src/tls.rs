//! https clients that trust the deployment's private CA
//! ([`vtp_core::tls::CA_CERT_ENV`], `VTP_CA_CERT`) besides the system's
//! roots: the backend client, the trainer's reports, the HTTP launcher, the
//! CLI and the Python client all build theirs here.

use std::path::Path;

use vtp_core::{Error, Result};

/// `builder`, trusting the certificates of the PEM bundle at `path` as well
/// as the system's roots.
///
/// # Errors
/// [`Error::InvalidInput`] naming `field` when the file cannot be read or
/// holds no PEM certificate bundle.
pub fn trust_ca_file(
    builder: reqwest::ClientBuilder,
    field: &str,
    path: &Path,
) -> Result<reqwest::ClientBuilder> {
    let pem = vtp_core::tls::read_ca_bundle(field, path)?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| Error::invalid(field, format!("not a PEM certificate bundle: {e}")))?;
    Ok(builder.tls_certs_merge(certs))
}

/// A client builder trusting `VTP_CA_CERT` when it is set.
///
/// # Errors
/// [`Error::InvalidInput`] naming `VTP_CA_CERT` when it names no readable
/// certificate bundle.
pub fn client_builder() -> Result<reqwest::ClientBuilder> {
    let builder = reqwest::Client::builder();
    match std::env::var_os(vtp_core::tls::CA_CERT_ENV).filter(|v| !v.is_empty()) {
        Some(path) => trust_ca_file(builder, vtp_core::tls::CA_CERT_ENV, Path::new(&path)),
        None => Ok(builder),
    }
}
