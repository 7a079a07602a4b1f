//! A throwaway certificate authority, a server certificate for 127.0.0.1 and a client
//! certificate, made with the `openssl` tool, for the tests of TLS to Redis and PostgreSQL.

use std::io;
use std::path::Path;
use std::process::Command;

/// Whether the `openssl` tool runs (the TLS tests skip, saying so, without it).
pub fn openssl_available() -> bool {
    let ok = Command::new("openssl").arg("version").output().is_ok();
    if !ok {
        eprintln!("SKIPPED: openssl is not installed (apt-get install openssl)");
    }
    ok
}

/// Write `ca.pem` (the CA), `server.pem` and `server.key` (for IP 127.0.0.1), and
/// `client.pem` and `client.key` (CN `fbpkg`, for servers that ask clients for a
/// certificate), both signed by the CA and valid two days, into `dir`.
pub fn make(dir: &Path) -> io::Result<()> {
    run(
        Command::new("openssl")
            .args(["req", "-x509"])
            .args(EC_KEY)
            .args(["-keyout", "ca.key", "-out", "ca.pem"])
            .args(["-days", "2", "-subj", "/CN=fbpkg-test"]),
        dir,
    )?;
    signed(
        dir,
        "server",
        "/CN=fbpkg-test",
        "subjectAltName=IP:127.0.0.1",
    )?;
    signed(dir, "client", "/CN=fbpkg", "extendedKeyUsage=clientAuth")
}

/// A new P-256 key, unencrypted.
const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// `<name>.key` and `<name>.pem`: a key, and its certificate for `subject` with the extension
/// `ext`, signed by the CA in `dir` and valid two days.
fn signed(dir: &Path, name: &str, subject: &str, ext: &str) -> io::Result<()> {
    let (key, csr, pem, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&extfile), format!("{ext}\n"))?;
    run(
        Command::new("openssl")
            .arg("req")
            .args(EC_KEY)
            .args(["-keyout", &key, "-out", &csr, "-subj", subject]),
        dir,
    )?;
    run(
        Command::new("openssl")
            .args([
                "x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key",
            ])
            .args([
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ]),
        dir,
    )
}

/// Run one `openssl` command in `dir`; its stderr in the error when it fails.
fn run(cmd: &mut Command, dir: &Path) -> io::Result<()> {
    let out = cmd.current_dir(dir).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}
