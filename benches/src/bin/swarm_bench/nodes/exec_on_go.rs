//! Start a stock program at the common start instant: print `ready`, wait for `go` on stdin,
//! then replace this process with the program (`exec`).
//!
//! Why exec and not a child: the orchestrator already holds this process's pid, stdout and
//! stdin, so after the exec it samples the program's own CPU time and peak RSS, reads its
//! stdout, and stops it with a signal, as it does for its own nodes; and starting the program
//! costs one exec at `go`, not an `ip netns exec` per host after it.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

use anyhow::Context as _;
use serde_json::json;

use super::{emit, wait_for_go};

/// `exec-on-go` flags.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    argv: Vec<String>,
}

/// Wait for `go`, then become the program; returns only if the exec failed.
pub fn main(a: ExecArgs) -> anyhow::Result<()> {
    let (program, args) = a.argv.split_first().context("no program given")?;
    emit(json!({"event": "ready"}));
    wait_for_go()?;
    let err = Command::new(program).args(args).exec();
    Err(err).with_context(|| format!("exec {program}"))
}
