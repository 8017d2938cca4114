//! Trusting a private CA. A deployment whose backend, S3 endpoint or
//! trainer service presents a certificate from its own CA names that CA's
//! PEM file in [`CA_CERT_ENV`] (`VTP_CA_CERT`); every https client VTP makes
//! (the CLI, the Python client, the S3 store, the trainer's reports, the
//! HTTP launcher) trusts it besides the system's roots.

use std::path::Path;

use crate::{Error, Result};

/// The variable naming an extra CA bundle (PEM) to trust.
pub const CA_CERT_ENV: &str = "VTP_CA_CERT";

/// The PEM bundle at `path`, checked to hold at least one certificate so a
/// wrong file is refused where it is named, not at the first connection.
///
/// # Errors
/// [`Error::InvalidInput`] naming `field` when the file cannot be read or
/// holds no PEM certificate.
pub fn read_ca_bundle(field: &str, path: &Path) -> Result<Vec<u8>> {
    let pem = std::fs::read(path)
        .map_err(|e| Error::invalid(field, format!("{}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(Error::invalid(
            field,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("vtp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(
            &good,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(read_ca_bundle("ca", &good).is_ok());
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        for path in [junk, dir.join("missing.pem")] {
            match read_ca_bundle("ca_cert", &path) {
                Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "ca_cert"),
                other => panic!("{other:?}"),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
