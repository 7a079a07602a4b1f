//! A lease held through a PostgreSQL session-level advisory lock: exactly one session holds
//! it, and PostgreSQL releases it when that session ends, so when the replica holding it dies
//! (or loses its connection) another one takes it within a retry period.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::NoTls;

/// How often a replica without the lease tries to take it, and how often the holder checks
/// that its session is alive.
const RETRY: Duration = Duration::from_secs(1);

/// Whether this replica holds the lease now. Dropping it gives the lease up.
#[derive(Debug)]
pub struct Lease {
    held: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    pub(super) fn start(
        rt: &tokio::runtime::Runtime,
        config: tokio_postgres::Config,
        key: i64,
    ) -> Self {
        let held = Arc::new(AtomicBool::new(false));
        let task = rt.spawn(hold(config, key, held.clone()));
        Self { held, task }
    }

    /// Held now (as of the last check, at most [`RETRY`] ago).
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hold(config: tokio_postgres::Config, key: i64, held: Arc<AtomicBool>) {
    loop {
        if let Ok((client, connection)) = config.connect(NoTls).await {
            let driver = tokio::spawn(connection);
            loop {
                let got = if held.load(Ordering::Acquire) {
                    // Ours while the session lives: check that it does.
                    client.simple_query("SELECT 1").await.map(|_| true)
                } else {
                    client
                        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                        .await
                        .map(|row| row.get::<_, bool>(0))
                };
                match got {
                    Ok(now) => {
                        if now != held.swap(now, Ordering::AcqRel) && now {
                            tracing::info!(key, "took the lease: the rollout controller runs here");
                        }
                    }
                    Err(_) => break,
                }
                tokio::time::sleep(RETRY).await;
            }
            if held.swap(false, Ordering::AcqRel) {
                tracing::warn!(
                    key,
                    "lost the lease with the database session: the rollout controller stops here"
                );
            }
            driver.abort();
        }
        tokio::time::sleep(RETRY).await;
    }
}
