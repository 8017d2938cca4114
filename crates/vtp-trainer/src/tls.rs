//! https clients that trust the deployment's private CA
//! ([`vtp_core::tls::CA_CERT_ENV`], `VTP_CA_CERT`) besides the system's
//! roots: the trainer's reports, the HTTP launcher, the CLI and the Python
//! client all build theirs here.

use vtp_core::{Error, Result};

/// `builder`, trusting the certificates of the PEM bundle `pem` as well as
/// the system's roots.
///
/// # Errors
/// [`Error::InvalidInput`] naming `field` when the bundle does not parse.
pub fn trust_pem(
    builder: reqwest::ClientBuilder,
    field: &str,
    pem: &[u8],
) -> Result<reqwest::ClientBuilder> {
    let certs = reqwest::Certificate::from_pem_bundle(pem)
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
    match vtp_core::tls::ca_bundle_from_env()? {
        Some(pem) => trust_pem(builder, vtp_core::tls::CA_CERT_ENV, &pem),
        None => Ok(builder),
    }
}
