//! `fbpkg-rs tracker`.

use std::process::ExitCode;

use anyhow::Context as _;
use fbpkg_tracker::{AppState, TrackerArgs};

pub(super) fn run(args: TrackerArgs) -> anyhow::Result<ExitCode> {
    let config = args.into_config()?;
    super::runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let state = AppState::open(config)?;
        let shutdown = super::shutdown_on_signals();
        fbpkg_tracker::run(listener, state, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}
