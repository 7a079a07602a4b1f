#![allow(clippy::unwrap_used)]
//! `--origin-budget`: an origin seed stops uploading once it has sent its budget and the crowd
//! can finish among itself. The leechers' uploads are capped so that, without a budget, the
//! fast origin keeps serving them well past one copy — the control run checks that, so the
//! budgeted run's bound means something.

use std::sync::Arc;
use std::time::Duration;

use fbpkg_common::pkgref::PackageName;
use fbpkg_peer::engine::Phase;
use fbpkg_tests::{embedded_tracker, engine, random_package, seed_from_cache};
use tokio_util::sync::CancellationToken;

const LEECHERS: usize = 4;
const PACKAGE_BYTES: usize = 4 << 20;
const LEECHER_UPLOAD: u64 = 1 << 20;

/// Run one crowd; returns what the origin uploaded, in copies of the package.
async fn crowd(budget: Option<f64>) -> f64 {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let tracker = embedded_tracker(&base.join("tracker"), |c| {
        c.min_announce_interval = Duration::from_secs(1);
    })
    .await;
    let url = format!("http://{}", tracker.addr);
    let cancel = CancellationToken::new();
    let name = PackageName::new("budget").unwrap();
    let (bytes, meta) = random_package(
        &mut rand::rng(),
        PACKAGE_BYTES,
        "b.bin",
        &tracker.announce_url(),
    );
    let meta = Arc::new(meta);

    let seed = engine(&base.join("seed"), &url, &cancel, |c| {
        c.origin_budget = budget
    })
    .await;
    let origin = seed_from_cache(&seed, &name, &meta, &bytes, base);
    seed.tracker().publish(&name, &meta).await.unwrap();

    let mut waits = Vec::new();
    for i in 0..LEECHERS {
        let e = engine(&base.join(format!("l{i}")), &url, &cancel, |c| {
            c.max_upload_rate = Some(LEECHER_UPLOAD)
        })
        .await;
        let t = e.download(name.clone(), meta.clone()).await.unwrap();
        waits.push((e, t));
    }
    for (_, t) in &waits {
        let ended = tokio::time::timeout(Duration::from_secs(60), t.finished())
            .await
            .expect("every leecher finishes");
        let Phase::Seeding(done) = ended else {
            panic!("a leecher ended {ended:?}")
        };
        assert_eq!(std::fs::read(&done.launch_path).unwrap(), bytes);
    }
    let copies = origin.uploaded() as f64 / PACKAGE_BYTES as f64;
    cancel.cancel();
    for (e, _) in waits {
        e.shutdown().await;
    }
    seed.shutdown().await;
    tracker.shutdown.cancel();
    copies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_origin_over_budget_leaves_the_crowd_to_itself() {
    let unbounded = crowd(None).await;
    assert!(
        unbounded > 1.6,
        "control: without a budget the fast origin serves {unbounded:.2} copies"
    );
    let budgeted = crowd(Some(1.0)).await;
    eprintln!(
        "origin uploaded {unbounded:.2} copies without a budget, {budgeted:.2} with a budget of 1"
    );
    assert!(
        budgeted <= 1.3,
        "with a budget of 1 copy the origin sent {budgeted:.2}"
    );
}
