//! Running the tracker: `run(listener, state, shutdown)` serves until the token is cancelled.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::TrackerError;
use crate::http::{AppState, SharedState, app};

/// Serve on `listener` until `shutdown` is cancelled, then finish in-flight requests.
///
/// Also runs the sweeper that forgets peers silent for two announce intervals.
pub async fn run(
    listener: TcpListener,
    state: SharedState,
    shutdown: CancellationToken,
) -> Result<(), TrackerError> {
    let addr = listener
        .local_addr()
        .map_err(|e| TrackerError::storage("listener address", e))?;
    tracing::info!(%addr, data_dir = %state.config.data_dir.display(), "tracker listening");
    let sweeper = tokio::spawn(
        sweep(state.clone(), shutdown.clone()).instrument(tracing::info_span!("sweeper")),
    );
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let served = axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
    .await;
    shutdown.cancel();
    let _ = sweeper.await;
    tracing::info!(%addr, "tracker stopped");
    served.map_err(|e| TrackerError::storage("serving HTTP", e))
}

async fn sweep(state: SharedState, shutdown: CancellationToken) {
    let every = state.config.announce_interval / 2;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(cutoff) = Instant::now().checked_sub(state.config.announce_interval * 2) else {
            continue;
        };
        let dropped = state.swarms.sweep(cutoff);
        if dropped > 0 {
            tracing::debug!(dropped, "expired silent peers");
        }
    }
}

/// A tracker running in this process (the demo and tests embed one).
#[derive(Debug)]
pub struct Embedded {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state, for inspection.
    pub state: Arc<AppState>,
    /// Cancel to stop it.
    pub shutdown: CancellationToken,
    /// Finishes when it has stopped.
    pub task: tokio::task::JoinHandle<Result<(), TrackerError>>,
}

impl Embedded {
    /// Open the catalog, bind `config.listen` (port 0 picks a free one) and serve in a task.
    pub async fn start(
        config: crate::Config,
        shutdown: CancellationToken,
    ) -> Result<Self, TrackerError> {
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            TrackerError::Config(format!("cannot listen on {}: {e}", config.listen))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| TrackerError::storage("listener address", e))?;
        let state = AppState::open(config)?;
        let task = tokio::spawn(
            run(listener, state.clone(), shutdown.clone())
                .instrument(tracing::info_span!("tracker", %addr)),
        );
        Ok(Self {
            addr,
            state,
            shutdown,
            task,
        })
    }

    /// The announce URL peers should use.
    pub fn announce_url(&self) -> String {
        format!("http://{}/announce", self.addr)
    }
}
