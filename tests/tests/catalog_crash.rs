#![allow(clippy::unwrap_used)]
//! The catalog survives a restart and a kill -9 at any moment, with nothing lost or half-written.
//!
//! Writers publish versions, re-publish them and move tags against a real `fbpkg-rs tracker`
//! process while it is SIGKILLed at a random instant, round after round. After every restart:
//!
//! - every acknowledged (2xx) publish resolves, and its metainfo is exactly the bytes sent;
//! - every acknowledged tag move is in that tag's history, and tags point at stored versions;
//! - every version the catalog lists was sent by a writer and is byte-exact (a publish cut off
//!   by the kill is either wholly there or absent);
//! - re-publishing an acknowledged version answers 200 "unchanged", never 201 "created";
//! - `/readyz` is 200.
//!
//! Set `CRASH_SEED` to replay a run; the seed is printed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fbpkg_common::Sha256Hash;
use fbpkg_common::api::{PackageDetail, TagInfo, VersionInfo};
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::Tag;
use fbpkg_tests::{TrackerProcess, http_client, move_tag, publish, random_package};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use reqwest::StatusCode;
use tokio::time::Instant;

/// Kill/restart rounds.
const ROUNDS: usize = 8;
/// Concurrent writers, so a kill usually lands with several writes in flight.
const WRITERS: usize = 4;
const PACKAGES: [&str; 2] = ["crash-app", "crash-lib"];
const TAGS: [&str; 3] = ["prod", "canary", "dev"];
/// New versions one writer publishes per round; after that it only re-publishes and moves
/// tags, which keeps the catalog (and the checks) small while writes stay continuous.
const NEW_VERSIONS_PER_WRITER: usize = 10;
/// The kill comes at a random instant in this window after the writers start.
const KILL_WINDOW_MS: std::ops::RangeInclusive<u64> = 20..=350;
/// Bounds on one writer's round; the kill normally ends it long before.
const WRITER_DEADLINE: Duration = Duration::from_secs(5);
const MAX_OPS_PER_WRITER: usize = 5_000;

/// What the writers sent and what the tracker acknowledged.
#[derive(Debug, Default, Clone)]
struct Ledger {
    /// Every version sent, acknowledged or not.
    sent: BTreeMap<(String, Sha256Hash), Metainfo>,
    /// Versions whose publish was answered 2xx.
    acked: BTreeSet<(String, Sha256Hash)>,
    /// Tag moves answered 2xx: (package, tag, target).
    moves: BTreeSet<(String, String, Sha256Hash)>,
    /// Answers a live tracker should never give.
    wrong: Vec<String>,
    /// Requests that got no answer (the tracker was killed under them, or already dead).
    unanswered: usize,
}

impl Ledger {
    fn acked_of(&self, package: &str) -> Vec<Sha256Hash> {
        self.acked
            .iter()
            .filter(|(p, _)| p == package)
            .map(|(_, h)| *h)
            .collect()
    }
}

enum Op {
    Publish(String, Metainfo),
    Republish(String, Metainfo),
    MoveTag(String, String, Sha256Hash),
}

/// Publish, re-publish and move tags until the tracker stops answering.
async fn writer(base_url: String, ledger: Arc<Mutex<Ledger>>, mut rng: StdRng) {
    let client = http_client();
    let deadline = Instant::now() + WRITER_DEADLINE;
    let mut created = 0;
    for _ in 0..MAX_OPS_PER_WRITER {
        if Instant::now() >= deadline {
            break;
        }
        let package = PACKAGES[rng.random_range(0..PACKAGES.len())].to_owned();
        let acked = ledger.lock().unwrap().acked_of(&package);
        let dice = rng.random_range(0..10);
        let op = if acked.is_empty() || (dice < 5 && created < NEW_VERSIONS_PER_WRITER) {
            let size = rng.random_range(1..=70_000);
            let (_, m) =
                random_package(&mut rng, size, "payload.bin", "http://127.0.0.1:1/announce");
            created += 1;
            Op::Publish(package, m)
        } else if dice < 7 {
            let sha = acked[rng.random_range(0..acked.len())];
            let m = ledger.lock().unwrap().sent[&(package.clone(), sha)].clone();
            Op::Republish(package, m)
        } else {
            let tag = TAGS[rng.random_range(0..TAGS.len())].to_owned();
            Op::MoveTag(package, tag, acked[rng.random_range(0..acked.len())])
        };
        let answer = match &op {
            Op::Publish(p, m) => {
                ledger
                    .lock()
                    .unwrap()
                    .sent
                    .insert((p.clone(), m.sha256), m.clone());
                publish(&client, &base_url, p, m).await
            }
            Op::Republish(p, m) => publish(&client, &base_url, p, m).await,
            Op::MoveTag(p, t, sha) => move_tag(&client, &base_url, p, t, sha).await,
        };
        let mut l = ledger.lock().unwrap();
        let status = match answer {
            Ok(s) => s,
            Err(_) => {
                l.unanswered += 1;
                return;
            }
        };
        match op {
            Op::Publish(p, m) if status.is_success() => {
                l.acked.insert((p, m.sha256));
            }
            // An acknowledged version is already stored: 201 here would mean it had been lost.
            Op::Republish(_, _) if status == StatusCode::OK => {}
            Op::MoveTag(p, t, sha) if status.is_success() => {
                l.moves.insert((p, t, sha));
            }
            Op::Publish(p, m) => l.wrong.push(format!("publish {p}:{}: {status}", m.sha256)),
            Op::Republish(p, m) => l.wrong.push(format!(
                "re-publish of acknowledged {p}:{}: {status}",
                m.sha256
            )),
            Op::MoveTag(p, t, sha) => l.wrong.push(format!("move {p} {t} -> {sha}: {status}")),
        }
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    if status != StatusCode::OK {
        let body = resp.text().await.unwrap_or_default();
        return Err(format!("GET {url}: {status} {body}"));
    }
    resp.json().await.map_err(|e| format!("GET {url}: {e}"))
}

/// Check the restarted tracker against everything acknowledged so far.
async fn verify(tracker: &TrackerProcess, ledger: &Ledger, round: usize) {
    let client = http_client();
    let base = tracker.base_url();
    let ctx = |msg: String| {
        format!(
            "after restart {round}: {msg}\ntracker log:\n{}",
            tracker.log_tail()
        )
    };

    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "{}", ctx("readyz".into()));

    for package in PACKAGES {
        let acked: BTreeSet<Sha256Hash> = ledger.acked_of(package).into_iter().collect();
        let url = format!("{base}/api/v1/packages/{package}");
        let detail: PackageDetail = match get_json(&client, &url).await {
            Ok(d) => d,
            Err(e) if acked.is_empty() && e.contains("404") => continue,
            Err(e) => panic!("{}", ctx(e)),
        };
        let listed: BTreeSet<Sha256Hash> = detail.versions.iter().map(|v| v.sha256).collect();
        let lost: Vec<_> = acked.difference(&listed).collect();
        assert!(
            lost.is_empty(),
            "{}",
            ctx(format!("{package}: acknowledged versions lost: {lost:?}"))
        );

        // Every listed version, acknowledged or cut off by the kill, is whole.
        for v in &detail.versions {
            let key = (package.to_owned(), v.sha256);
            let Some(sent) = ledger.sent.get(&key) else {
                panic!("{}", ctx(format!("{package}:{} was never sent", v.sha256)));
            };
            let url = format!("{base}/api/v1/packages/{package}/{}", v.sha256);
            let info: VersionInfo = get_json(&client, &url)
                .await
                .unwrap_or_else(|e| panic!("{}", ctx(e)));
            assert_eq!(
                (info.sha256, info.info_hash, info.size),
                (sent.sha256, sent.info_hash, sent.length),
                "{}",
                ctx(format!("{url} describes another version"))
            );
            let url = format!("{url}/metainfo");
            let resp = client.get(&url).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{}", ctx(url.clone()));
            let bytes = resp.bytes().await.unwrap();
            assert!(
                bytes[..] == *sent.as_bytes(),
                "{}",
                ctx(format!(
                    "{url}: {} bytes, not the {} published",
                    bytes.len(),
                    sent.as_bytes().len()
                ))
            );
        }

        for tag in TAGS {
            let moves: Vec<Sha256Hash> = ledger
                .moves
                .iter()
                .filter(|(p, t, _)| p == package && t == tag)
                .map(|(_, _, h)| *h)
                .collect();
            let url = format!("{base}/api/v1/packages/{package}/tags/{tag}");
            let info: TagInfo = match get_json(&client, &url).await {
                Ok(i) => i,
                Err(e) if moves.is_empty() && e.contains("404") => continue,
                Err(e) => panic!("{}", ctx(e)),
            };
            assert_eq!(
                detail.tags.get(&Tag::new(tag).unwrap()).map(|i| &i.history),
                Some(&info.history),
                "{}",
                ctx(format!("{url} disagrees with the package detail"))
            );
            assert_eq!(
                info.history.last().map(|m| m.sha256),
                Some(info.sha256),
                "{}",
                ctx(format!("{url}: current target is not the last move"))
            );
            let history: BTreeSet<Sha256Hash> = info.history.iter().map(|m| m.sha256).collect();
            let missing: Vec<_> = moves.iter().filter(|h| !history.contains(h)).collect();
            assert!(
                missing.is_empty(),
                "{}",
                ctx(format!(
                    "{package} {tag}: acknowledged moves lost: {missing:?}"
                ))
            );
            let ghosts: Vec<_> = history.difference(&listed).collect();
            assert!(
                ghosts.is_empty(),
                "{}",
                ctx(format!(
                    "{package} {tag}: history names unknown versions {ghosts:?}"
                ))
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill_at_any_moment() {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut tracker = TrackerProcess::start(dir.path()).unwrap();

    for round in 1..=ROUNDS {
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let rng = StdRng::seed_from_u64(rng.random());
                tokio::spawn(writer(tracker.base_url(), ledger.clone(), rng))
            })
            .collect();
        // The fault: a SIGKILL at a random instant of the write stream (this sleep picks the
        // moment; it waits for nothing).
        tokio::time::sleep(Duration::from_millis(rng.random_range(KILL_WINDOW_MS))).await;
        tracker.kill().unwrap();
        for w in writers {
            tokio::time::timeout(WRITER_DEADLINE * 2, w)
                .await
                .expect("a writer did not stop after the kill")
                .unwrap();
        }
        tracker = TrackerProcess::start(dir.path()).unwrap();
        let snapshot = ledger.lock().unwrap().clone();
        assert!(
            snapshot.wrong.is_empty(),
            "round {round}: the tracker gave wrong answers (CRASH_SEED={seed}):\n{}",
            snapshot.wrong.join("\n")
        );
        verify(&tracker, &snapshot, round).await;
    }

    let l = ledger.lock().unwrap().clone();
    println!(
        "{ROUNDS} kills: {} versions sent, {} acknowledged, {} tag moves acknowledged, {} requests unanswered",
        l.sent.len(),
        l.acked.len(),
        l.moves.len(),
        l.unanswered
    );
    // The run exercised what it claims to: writes were acknowledged, and kills cut writers off.
    assert!(
        l.acked.len() >= ROUNDS,
        "too few publishes acknowledged: {}",
        l.acked.len()
    );
    assert!(!l.moves.is_empty(), "no tag move was acknowledged");
    assert!(
        l.unanswered >= ROUNDS,
        "kills cut off only {} requests",
        l.unanswered
    );
}
