//! The rollout controller: one task per tracker that runs the gates on a tick and whenever a
//! report arrives.

use tokio_util::sync::CancellationToken;

use crate::http::SharedState;

/// Run the gates every `config.rollout_tick` and on every counted report, until `shutdown`.
/// Disk work (a phase change is a durable write) goes to the blocking pool.
pub async fn run_controller(state: SharedState, shutdown: CancellationToken) {
    // An unvalidated zero period would panic the interval; clamp instead.
    let period = state
        .config
        .rollout_tick
        .max(std::time::Duration::from_millis(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = state.rollouts.woken() => {}
        }
        // With replicas, one runs the gates (the lease holder); the others see its changes.
        if !state.runs_controller() || !state.rollouts.has_active() {
            continue; // nothing to judge: no trip to the blocking pool four times a second
        }
        let now = tokio::time::Instant::now();
        let s = state.clone();
        let done =
            tokio::task::spawn_blocking(move || s.rollouts.tick(&s.catalog, now, super::wall_ms()))
                .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "rollout gate could not record a change"),
            Err(e) => tracing::error!(error = %e, "rollout gate task failed"),
        }
    }
}
