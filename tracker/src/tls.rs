//! TLS to the stores a tracker's replicas share, with rustls.

use std::path::Path;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

use crate::error::TrackerError;

/// Pick rustls's crypto provider once per process: two are linked in (other crates bring
/// ring), and rustls refuses to guess. An error means one is installed already, as good.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The PEM file a `--...-ca` flag names, read at start; `None` without the flag.
pub fn read_ca(path: Option<&Path>, flag: &str) -> Result<Option<Vec<u8>>, TrackerError> {
    path.map(|p| {
        std::fs::read(p).map_err(|e| {
            TrackerError::Config(format!("{flag} {}: cannot read it: {e}", p.display()))
        })
    })
    .transpose()
}

/// A client configuration trusting the certificates in `ca` (PEM), or the system's when
/// `None`. `what` names the flag for errors (`--catalog-ca`).
pub fn client_config(ca: Option<&[u8]>, what: &str) -> Result<rustls::ClientConfig, TrackerError> {
    install_provider();
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TrackerError::Config(format!("{what}: not a PEM file: {e}")))?;
            if certs.is_empty() {
                return Err(TrackerError::Config(format!(
                    "{what}: no certificate in it"
                )));
            }
            for c in certs {
                roots.add(c).map_err(|e| {
                    TrackerError::Config(format!("{what}: a certificate rustls refuses: {e}"))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TrackerError::Config(format!(
                    "no system certificate authorities found for TLS (install ca-certificates, \
                     or name one with {what})"
                )));
            }
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}
