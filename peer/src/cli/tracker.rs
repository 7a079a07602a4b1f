//! `fbpkg-rs tracker`.

use std::process::ExitCode;

use fbpkg_tracker::{AppState, TrackerArgs};

pub(super) fn run(args: TrackerArgs) -> anyhow::Result<ExitCode> {
    let config = args.into_config()?;
    let listeners = fbpkg_tracker::bind(config.listen, config.threads)?;
    // The serving threads run their own runtimes; this one holds the sweeper and signals.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let state = AppState::open(config)?;
        let shutdown = super::shutdown_on_signals();
        fbpkg_tracker::run(listeners, state, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}
