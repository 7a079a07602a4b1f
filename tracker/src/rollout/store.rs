//! Where rollouts are kept: the [`RolloutStore`] trait, and [`FileStore`], its file-backed
//! implementation with the catalog's discipline.
//!
//! ```text
//! <data>/rollouts/v1/<name>/<tag>.json    TagRollouts: the active rollout and the history
//! ```
//!
//! Every change replaces the tag's file whole (temporary file, fsync, rename, fsync of the
//! directory), so a kill -9 at any instant leaves the state before or after the change. Only
//! durable state goes here; what hosts report is soft state, rebuilt from their next reports.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fbpkg_common::api::Rollout;
use fbpkg_common::pkgref::{PackageName, Tag};
use serde::{Deserialize, Serialize};

use crate::durable::{keep_unreadable, stale_tmp, store_root, write_atomic};
use crate::error::TrackerError;
use crate::postgres::{Pg, ROLLOUT_CHANNEL};

/// Everything durable about one tag's rollouts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRollouts {
    /// The last rollout id given out for this tag.
    pub last_id: u64,
    /// The active rollout (running, paused or halted).
    pub current: Option<Rollout>,
    /// Finished rollouts and plain tag moves, oldest first, bounded.
    pub history: Vec<Rollout>,
}

/// What [`RolloutStore::hold`] holds until dropped.
pub type Held = Box<dyn Send>;

/// Durable storage of rollouts, one record per tag: files ([`FileStore`]) or PostgreSQL
/// ([`PgStore`]), where replicas share them.
pub trait RolloutStore: Send + Sync + std::fmt::Debug {
    /// Every tag's record.
    fn load_all(&self) -> Result<Vec<(PackageName, Tag, TagRollouts)>, TrackerError>;
    /// One tag's record as stored now.
    fn load(&self, name: &PackageName, tag: &Tag) -> Result<Option<TagRollouts>, TrackerError> {
        Ok(self
            .load_all()?
            .into_iter()
            .find(|(n, t, _)| n == name && t == tag)
            .map(|(_, _, r)| r))
    }
    /// One tag's record as stored now, for a change of it: a record that cannot be read is
    /// an error here (a change would start a new record over it), where [`Self::load`] passes
    /// it over.
    fn load_for_change(
        &self,
        name: &PackageName,
        tag: &Tag,
    ) -> Result<Option<TagRollouts>, TrackerError> {
        self.load(name, tag)
    }
    /// Shared by replicas (each with its own memory of the records, a moment behind)?
    fn shared(&self) -> bool {
        false
    }
    /// Keep every other replica from changing `name:tag`'s record until the returned guard
    /// drops, so one change reads the record as stored, does its other durable work (moving
    /// the catalog's tag) and saves, with no other change in between. `None` from a store
    /// only this process writes: the rollouts' write lock is enough, and memory holds the
    /// record as stored.
    fn hold(&self, _name: &PackageName, _tag: &Tag) -> Result<Option<Held>, TrackerError> {
        Ok(None)
    }
    /// Replace one tag's record, which was `before` when this process read it; when this
    /// returns `Ok` the record survives a crash. A store shared by replicas refuses (conflict)
    /// when another changed the record since.
    fn save(
        &self,
        name: &PackageName,
        tag: &Tag,
        before: &TagRollouts,
        rec: &TagRollouts,
    ) -> Result<(), TrackerError>;
}

/// The file-backed store (see the module doc for the layout).
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Open (creating if needed) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, TrackerError> {
        Ok(Self {
            root: store_root(data_dir, "rollouts")?,
        })
    }

    fn path(&self, name: &PackageName, tag: &Tag) -> PathBuf {
        self.root
            .join(name.as_str())
            .join(format!("{}.json", tag.as_str()))
    }
}

fn entries(dir: &Path) -> Result<Vec<fs::DirEntry>, TrackerError> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(rd.flatten().collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(TrackerError::storage(
            format!("reading {}", dir.display()),
            e,
        )),
    }
}

impl RolloutStore for FileStore {
    fn load_all(&self) -> Result<Vec<(PackageName, Tag, TagRollouts)>, TrackerError> {
        let mut out = Vec::new();
        for pkg in entries(&self.root)? {
            let Ok(name) = PackageName::new(&pkg.file_name().to_string_lossy()) else {
                continue;
            };
            for entry in entries(&pkg.path())? {
                let path = entry.path();
                let file = entry.file_name().to_string_lossy().into_owned();
                if file.starts_with(".tmp-") {
                    // A write that never reached its rename: it was never acknowledged. Ours
                    // may be one in progress (`stale_tmp`).
                    if stale_tmp(&file) {
                        let _ = fs::remove_file(&path);
                    }
                    continue;
                }
                let Some(tag) = file.strip_suffix(".json").and_then(|t| Tag::new(t).ok()) else {
                    continue;
                };
                let rec = fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                    serde_json::from_slice::<TagRollouts>(&b).map_err(|e| e.to_string())
                });
                match rec {
                    Ok(rec) => out.push((name.clone(), tag, rec)),
                    // Left on disk for a human: refusing to start would take the whole
                    // catalog down for one tag's history.
                    Err(e) => {
                        tracing::error!(package = %name, %tag, error = %e, "unreadable rollout file; skipped (kept aside at the next change)")
                    }
                }
            }
        }
        Ok(out)
    }

    fn save(
        &self,
        name: &PackageName,
        tag: &Tag,
        before: &TagRollouts,
        rec: &TagRollouts,
    ) -> Result<(), TrackerError> {
        // One process writes here, one change at a time (the rollouts' write lock).
        let path = self.path(name, tag);
        if *before == TagRollouts::default() {
            // A file the load skipped (unreadable): its history is kept, not written over.
            keep_unreadable(&path)?;
        }
        let json = serde_json::to_vec_pretty(rec)
            .map_err(|e| TrackerError::storage("encoding rollouts", e.into()))?;
        write_atomic(&path, &json)
            .map_err(|e| TrackerError::storage(format!("writing {}", path.display()), e))
    }
}

/// Rollout records in PostgreSQL: the `rollouts` table holds each tag's record, and every save
/// also appends it to `rollout_changes` (each transition of each rollout, kept), with a
/// notification so other replicas reload the tag.
#[derive(Debug)]
pub struct PgStore {
    pg: Arc<Pg>,
}

impl PgStore {
    /// A store on `pg` (connected and migrated).
    pub fn new(pg: Arc<Pg>) -> Self {
        Self { pg }
    }
}

fn encode(rec: &TagRollouts) -> Result<serde_json::Value, TrackerError> {
    serde_json::to_value(rec).map_err(|e| TrackerError::storage("encoding rollouts", e.into()))
}

fn decode(name: &str, tag: &str, v: serde_json::Value) -> Option<TagRollouts> {
    serde_json::from_value(v)
        .inspect_err(|e| tracing::error!(package = %name, %tag, error = %e, "unreadable rollout row; skipped"))
        .ok()
}

impl PgStore {
    /// One tag's row as stored, undecoded.
    fn row(
        &self,
        name: &PackageName,
        tag: &Tag,
    ) -> Result<Option<serde_json::Value>, TrackerError> {
        let (n, t) = (name.as_str(), tag.as_str());
        self.pg.run("loading a rollout", |db| async move {
            db.query_opt(
                "SELECT record FROM rollouts WHERE name = $1 AND tag = $2",
                &[&n, &t],
            )
            .await
            .map(|r| r.map(|r| r.get::<_, serde_json::Value>(0)))
        })
    }
}

impl RolloutStore for PgStore {
    fn load_all(&self) -> Result<Vec<(PackageName, Tag, TagRollouts)>, TrackerError> {
        let rows = self.pg.run("loading rollouts", |db| async move {
            let rows = db
                .query("SELECT name, tag, record FROM rollouts", &[])
                .await?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1), r.get(2)))
                .collect::<Vec<(String, String, serde_json::Value)>>())
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(n, t, v)| {
                let rec = decode(&n, &t, v)?;
                Some((PackageName::new(&n).ok()?, Tag::new(&t).ok()?, rec))
            })
            .collect())
    }

    fn load(&self, name: &PackageName, tag: &Tag) -> Result<Option<TagRollouts>, TrackerError> {
        Ok(self
            .row(name, tag)?
            .and_then(|v| decode(name.as_str(), tag.as_str(), v)))
    }

    fn load_for_change(
        &self,
        name: &PackageName,
        tag: &Tag,
    ) -> Result<Option<TagRollouts>, TrackerError> {
        // A change would start a new record, and its save would be refused for ever as a
        // conflict with one nobody can read.
        self.row(name, tag)?
            .map(|v| {
                serde_json::from_value(v).map_err(|e| {
                    TrackerError::storage(
                        format!("the rollout record of {name}:{tag} in the database is unreadable ({e}); repair or delete its row in `rollouts`"),
                        io::Error::other("unreadable record"),
                    )
                })
            })
            .transpose()
    }

    fn shared(&self) -> bool {
        true
    }

    fn hold(&self, name: &PackageName, tag: &Tag) -> Result<Option<Held>, TrackerError> {
        // Its own lock class: a tag move takes `fbpkg.tag` on the same pair while this is held.
        let key = format!("{name}:{tag}");
        let held = self.pg.hold(
            "waiting for another replica's change of a rollout",
            "fbpkg.rollout",
            &key,
        )?;
        Ok(Some(Box::new(held)))
    }

    fn save(
        &self,
        name: &PackageName,
        tag: &Tag,
        before: &TagRollouts,
        rec: &TagRollouts,
    ) -> Result<(), TrackerError> {
        let (n, t) = (name.as_str(), tag.as_str());
        let (old, new) = (encode(before)?, encode(rec)?);
        let fresh = *before == TagRollouts::default();
        let saved = self.pg.run("saving a rollout", |mut db| async move {
            let tx = db.transaction().await?;
            // Written only over the record this replica read: a change made meanwhile on
            // another replica is not overwritten.
            let n_rows = if fresh {
                tx.execute(
                    "INSERT INTO rollouts (name, tag, record) VALUES ($1, $2, $3)
                     ON CONFLICT (name, tag) DO NOTHING",
                    &[&n, &t, &new],
                )
                .await?
            } else {
                tx.execute(
                    "UPDATE rollouts SET record = $3 WHERE name = $1 AND tag = $2 AND record = $4",
                    &[&n, &t, &new, &old],
                )
                .await?
            };
            if n_rows == 1 {
                tx.execute(
                    "INSERT INTO rollout_changes (name, tag, record) VALUES ($1, $2, $3)",
                    &[&n, &t, &new],
                )
                .await?;
                tx.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&ROLLOUT_CHANNEL, &format!("{n}:{t}")],
                )
                .await?;
                tx.commit().await?;
            }
            Ok(n_rows == 1)
        })?;
        if saved {
            Ok(())
        } else {
            Err(TrackerError::Conflict(format!(
                "the rollouts of {name}:{tag} changed on another tracker replica a moment ago; \
                 look again and retry"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A tag's rollout file the load could not read is skipped, and the first change of that
    /// tag keeps it beside instead of writing over its history.
    #[test]
    fn an_unreadable_record_is_kept_aside_not_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let (name, tag) = (PackageName::new("app").unwrap(), Tag::new("prod").unwrap());
        let path = store.path(&name, &tag);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"{\"last_id\": 7, \"curr").unwrap();
        assert!(store.load_all().unwrap().is_empty());
        let rec = TagRollouts {
            last_id: 1,
            ..TagRollouts::default()
        };
        store
            .save(&name, &tag, &TagRollouts::default(), &rec)
            .unwrap();
        let kept: Vec<Vec<u8>> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("prod.json.unreadable-")
            })
            .map(|e| fs::read(e.path()).unwrap())
            .collect();
        assert_eq!(kept, vec![b"{\"last_id\": 7, \"curr".to_vec()]);
        let all = store.load_all().unwrap();
        assert_eq!(all, vec![(name, tag, rec)]);
    }
}
