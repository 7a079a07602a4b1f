//! `fbpkg-rs`: the one binary. See `fbpkg-rs --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    fbpkg_peer::cli::main()
}
