//! TLS to the stores a tracker's replicas share, with rustls.

/// Pick rustls's crypto provider once per process: two are linked in (other crates bring
/// ring), and rustls refuses to guess. An error means one is installed already, as good.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
