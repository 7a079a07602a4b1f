//! A lease held through a PostgreSQL session-level advisory lock: exactly one session holds
//! it, and PostgreSQL releases it when that session ends, so when the replica holding it dies
//! (or loses its connection) another one takes it within a retry period.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

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
    /// Hold `key` through sessions made as the pool makes them: `tls` when the catalog URL
    /// asks for it (a lease session without it would be refused by a TLS-only server, and no
    /// replica would ever run the controller). A query that takes longer than `timeout` counts
    /// as a lost session: on a half-open connection the server may have let the lock go.
    pub(super) fn start(
        rt: &tokio::runtime::Runtime,
        config: tokio_postgres::Config,
        tls: Option<MakeRustlsConnect>,
        key: i64,
        timeout: Duration,
    ) -> Self {
        let held = Arc::new(AtomicBool::new(false));
        let task = match tls {
            Some(tls) => rt.spawn(hold(config, tls, key, held.clone(), timeout)),
            None => rt.spawn(hold(config, NoTls, key, held.clone(), timeout)),
        };
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

async fn hold<T>(
    config: tokio_postgres::Config,
    tls: T,
    key: i64,
    held: Arc<AtomicBool>,
    timeout: Duration,
) where
    T: MakeTlsConnect<Socket> + Clone,
    T::Stream: Send + 'static,
{
    let mut warned = false;
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, connection)) => {
                warned = false;
                let driver = tokio::spawn(connection);
                if tokio::time::timeout(timeout, super::notice_a_dead_client(&client))
                    .await
                    .is_err()
                {
                    driver.abort();
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                loop {
                    let query = async {
                        if held.load(Ordering::Acquire) {
                            // Ours while the session lives: check that it does.
                            client.simple_query("SELECT 1").await.map(|_| true)
                        } else {
                            client
                                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                                .await
                                .map(|row| row.get::<_, bool>(0))
                        }
                    };
                    match tokio::time::timeout(timeout, query).await {
                        Ok(Ok(now)) => {
                            if now != held.swap(now, Ordering::AcqRel) && now {
                                tracing::info!(
                                    key,
                                    "took the lease: the rollout controller runs here"
                                );
                            }
                        }
                        Ok(Err(_)) | Err(_) => break,
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
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(key, error = %e, "cannot open a session for the controller's lease; trying again every second");
            }
            Err(_) => {}
        }
        tokio::time::sleep(RETRY).await;
    }
}
