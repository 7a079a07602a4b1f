//! TLS to the stores a tracker's replicas share, with rustls.

use std::path::Path;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::TrackerError;

/// Pick rustls's crypto provider once per process: two are linked in (other crates bring
/// ring), and rustls refuses to guess. An error means one is installed already, as good.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// What TLS to one store trusts and shows, read from its flags at start
/// (`--peer-store-ca/-cert/-key`, `--catalog-ca/-cert/-key`).
#[derive(Clone, Default)]
pub struct TlsFiles {
    /// PEM of the certificate authorities to trust; `None`: the system's.
    pub ca: Option<Vec<u8>>,
    /// PEM of the client certificate (chain) and of its private key, for a server that asks
    /// clients for one (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The flags' common prefix, for errors (`--catalog`).
    pub flags: &'static str,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsFiles")
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .field("flags", &self.flags)
            .finish()
    }
}

impl TlsFiles {
    /// Read the files `{flags}-ca`, `{flags}-cert` and `{flags}-key` name (cert and key go
    /// together: the configuration checks that), and check the certificate and key parse, so
    /// a bad file stops the start rather than every connection.
    pub fn read(
        flags: &'static str,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, TrackerError> {
        let files = Self {
            ca: read_file(ca, &format!("{flags}-ca"))?,
            identity: match (
                read_file(cert, &format!("{flags}-cert"))?,
                read_file(key, &format!("{flags}-key"))?,
            ) {
                (Some(c), Some(k)) => Some((c, k)),
                _ => None,
            },
            flags,
        };
        files.client_identity()?;
        Ok(files)
    }

    /// Nothing given: plain defaults (the system's CAs, no client certificate).
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.identity.is_none()
    }

    /// The client certificate chain and key, parsed.
    fn client_identity(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TrackerError> {
        let Some((cert, key)) = &self.identity else {
            return Ok(None);
        };
        let flags = self.flags;
        let chain = certificates(cert, &format!("{flags}-cert"))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
            TrackerError::Config(format!("{flags}-key: no private key read from it: {e}"))
        })?;
        Ok(Some((chain, key)))
    }
}

/// The certificates in the PEM file `flag` names: at least one.
fn certificates(pem: &[u8], flag: &str) -> Result<Vec<CertificateDer<'static>>, TrackerError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrackerError::Config(format!("{flag}: not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(TrackerError::Config(format!(
            "{flag}: no certificate in it"
        )));
    }
    Ok(certs)
}

/// The file a flag names, read at start; `None` without the flag.
fn read_file(path: Option<&Path>, flag: &str) -> Result<Option<Vec<u8>>, TrackerError> {
    path.map(|p| {
        std::fs::read(p).map_err(|e| {
            TrackerError::Config(format!("{flag} {}: cannot read it: {e}", p.display()))
        })
    })
    .transpose()
}

/// A client configuration trusting `files.ca` (or the system's certificate authorities), and
/// showing `files.identity` when a server asks for a client certificate.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TrackerError> {
    install_provider();
    let what = format!("{}-ca", files.flags);
    let mut roots = rustls::RootCertStore::empty();
    match files.ca.as_deref() {
        Some(pem) => {
            for c in certificates(pem, &what)? {
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
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match files.client_identity()? {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
            TrackerError::Config(format!(
                "{}-cert and {}-key: rustls refuses them: {e}",
                files.flags, files.flags
            ))
        }),
        None => Ok(builder.with_no_client_auth()),
    }
}
