//! File digests, shared by the engine's checkpoints and the service's
//! stored checkpoint sets.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};
use vtp_core::{Error, Result};

/// Hex sha256 of a file.
///
/// # Errors
/// I/O errors.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |e: std::io::Error| Error::internal(format!("{}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
