//! The PostgreSQL catalog store (`--catalog postgres://...`), shared by tracker replicas.
//!
//! Tables (`crate::postgres`'s migrations): `versions` (immutable: a trigger refuses updates
//! and deletes), `tags` (where each points now) and `tag_moves` (every move, in order). A
//! write and its `pg_notify` commit together, so a replica never hears of a change it cannot
//! read yet.
//!
//! Concurrency between replicas: a version's primary key makes the first publish win (a second
//! sees the stored one, as a publish to one process does); tag moves of one tag take a
//! transaction-scoped advisory lock on it, so moves are serialised and every one is a history
//! row, whichever replica made it.

use std::collections::BTreeMap;
use std::sync::Arc;

use fbpkg_common::Sha256Hash;
use fbpkg_common::api::{TagInfo, TagMove};
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::{PackageName, Tag};
use tokio_postgres::GenericClient;

use super::{CatalogStore, Package, Version};
use crate::error::TrackerError;
use crate::postgres::{CATALOG_CHANNEL, Pg};

/// The catalog in PostgreSQL.
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

/// Rows to packages; a row that does not parse is logged and skipped, as the file store skips
/// an unreadable file (one bad row must not take the catalog down).
async fn load(
    db: &impl GenericClient,
    only: Option<&str>,
) -> Result<BTreeMap<PackageName, Package>, tokio_postgres::Error> {
    let filter = |sql: &str| match only {
        Some(_) => format!("{sql} WHERE name = $1"),
        None => sql.to_owned(),
    };
    let name = only.unwrap_or_default();
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = match only {
        Some(_) => vec![&name],
        None => Vec::new(),
    };
    let mut out: BTreeMap<PackageName, Package> = BTreeMap::new();
    let versions = db
        .query(
            &filter("SELECT name, sha256, metainfo, published_at FROM versions"),
            &params,
        )
        .await?;
    for row in versions {
        let (name, sha): (String, String) = (row.get(0), row.get(1));
        let parsed = PackageName::new(&name)
            .map_err(|e| e.to_string())
            .and_then(|n| {
                let m = Metainfo::parse(row.get::<_, &[u8]>(2)).map_err(|e| e.to_string())?;
                if m.sha256.to_hex() != sha {
                    return Err("the row's sha256 is not its metainfo's".to_owned());
                }
                Ok((n, m))
            });
        match parsed {
            Ok((n, m)) => {
                let published_at = u64::try_from(row.get::<_, i64>(3)).unwrap_or(0);
                out.entry(n).or_default().versions.insert(
                    m.sha256,
                    Version {
                        metainfo: Arc::new(m),
                        published_at,
                    },
                );
            }
            Err(e) => {
                tracing::error!(package = %name, sha256 = %sha, error = %e, "unreadable version row; skipped")
            }
        }
    }
    let moves = db
        .query(
            &(filter("SELECT name, tag, sha256, at FROM tag_moves") + " ORDER BY id"),
            &params,
        )
        .await?;
    for row in moves {
        let (name, tag, sha): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let (Ok(n), Ok(t), Ok(h)) = (
            PackageName::new(&name),
            Tag::new(&tag),
            Sha256Hash::from_hex(&sha),
        ) else {
            tracing::error!(package = %name, %tag, "unreadable tag move row; skipped");
            continue;
        };
        let Some(pkg) = out.get_mut(&n) else { continue };
        if !pkg.versions.contains_key(&h) {
            continue;
        }
        let info = pkg.tags.entry(t).or_insert_with(|| TagInfo {
            sha256: h,
            history: Vec::new(),
        });
        info.sha256 = h;
        info.history.push(TagMove {
            sha256: h,
            at: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
        });
    }
    Ok(out)
}

/// Every move of `name:tag` (`sha256`, unix secs), oldest first.
async fn tag_moves(
    db: &impl GenericClient,
    name: &str,
    tag: &str,
) -> Result<Vec<(String, i64)>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT sha256, at FROM tag_moves WHERE name = $1 AND tag = $2 ORDER BY id",
            &[&name, &tag],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect())
}

/// A tag from its moves (`sha256`, unix secs), oldest first; `None` without any.
fn tag_info(moves: Vec<(String, i64)>) -> Option<TagInfo> {
    let history: Vec<TagMove> = moves
        .into_iter()
        .filter_map(|(h, at)| {
            Some(TagMove {
                sha256: Sha256Hash::from_hex(&h).ok()?,
                at: u64::try_from(at).unwrap_or(0),
            })
        })
        .collect();
    Some(TagInfo {
        sha256: history.last()?.sha256,
        history,
    })
}

fn secs(at: u64) -> i64 {
    i64::try_from(at).unwrap_or(i64::MAX)
}

impl CatalogStore for PgStore {
    fn load_all(&self) -> Result<BTreeMap<PackageName, Package>, TrackerError> {
        self.pg.run("loading the catalog", |db| async move {
            load(&**db, None).await
        })
    }

    fn load_package(&self, name: &PackageName) -> Result<Package, TrackerError> {
        let n = name.as_str().to_owned();
        let mut all = self.pg.run("loading a package", |db| async move {
            load(&**db, Some(&n)).await
        })?;
        Ok(all.remove(name).unwrap_or_default())
    }

    fn insert_version(
        &self,
        name: &PackageName,
        version: &Version,
        metainfo_bytes: &[u8],
    ) -> Result<Option<Version>, TrackerError> {
        let (n, hex) = (name.as_str(), version.metainfo.sha256.to_hex());
        let (sha, at) = (&hex, secs(version.published_at));
        let stored = self.pg.run("publishing", |mut db| async move {
            let tx = db.transaction().await?;
            let inserted = tx
                .execute(
                    "INSERT INTO versions (name, sha256, metainfo, published_at)
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    &[&n, &sha, &metainfo_bytes, &at],
                )
                .await?;
            if inserted == 1 {
                tx.execute("SELECT pg_notify($1, $2)", &[&CATALOG_CHANNEL, &n])
                    .await?;
                tx.commit().await?;
                return Ok(None);
            }
            let row = tx
                .query_one(
                    "SELECT metainfo, published_at FROM versions WHERE name = $1 AND sha256 = $2",
                    &[&n, &sha],
                )
                .await?;
            Ok(Some((row.get::<_, Vec<u8>>(0), row.get::<_, i64>(1))))
        })?;
        let Some((bytes, at)) = stored else {
            return Ok(None);
        };
        let metainfo = Metainfo::parse(&bytes).map_err(|e| {
            TrackerError::storage(
                format!("reading {name}:{hex} back"),
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(Some(Version {
            metainfo: Arc::new(metainfo),
            published_at: u64::try_from(at).unwrap_or(0),
        }))
    }

    fn move_tag(
        &self,
        name: &PackageName,
        tag: &Tag,
        sha256: &Sha256Hash,
        at: u64,
        _known: Option<&TagInfo>,
    ) -> Result<TagInfo, TrackerError> {
        let (n, t, sha) = (name.as_str(), tag.as_str(), sha256.to_hex());
        let at = secs(at);
        let moves = self.pg.run("moving a tag", |mut db| async move {
            let tx = db.transaction().await?;
            // One mover per tag at a time, on every replica; released at commit.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('fbpkg.tag'), hashtext($1 || ':' || $2))",
                &[&n, &t],
            )
            .await?;
            let last = tx
                .query_opt(
                    "SELECT sha256 FROM tag_moves WHERE name = $1 AND tag = $2
                     ORDER BY id DESC LIMIT 1",
                    &[&n, &t],
                )
                .await?
                .map(|r| r.get::<_, String>(0));
            if last.as_deref() != Some(sha.as_str()) {
                tx.execute(
                    "INSERT INTO tags (name, tag, sha256) VALUES ($1, $2, $3)
                     ON CONFLICT (name, tag) DO UPDATE SET sha256 = EXCLUDED.sha256",
                    &[&n, &t, &sha],
                )
                .await?;
                tx.execute(
                    "INSERT INTO tag_moves (name, tag, sha256, at) VALUES ($1, $2, $3, $4)",
                    &[&n, &t, &sha, &at],
                )
                .await?;
                tx.execute("SELECT pg_notify($1, $2)", &[&CATALOG_CHANNEL, &n])
                    .await?;
            }
            let moves = tag_moves(&*tx, n, t).await?;
            tx.commit().await?;
            Ok(moves)
        })?;
        Ok(tag_info(moves).unwrap_or_else(|| TagInfo {
            sha256: *sha256,
            history: Vec::new(),
        }))
    }

    fn shared(&self) -> bool {
        true
    }

    fn load_tag(&self, name: &PackageName, tag: &Tag) -> Result<Option<TagInfo>, TrackerError> {
        let (n, t) = (name.as_str(), tag.as_str());
        let moves = self.pg.run(
            "reading a tag",
            |db| async move { tag_moves(&**db, n, t).await },
        )?;
        Ok(tag_info(moves))
    }

    fn check(&self) -> Result<(), String> {
        // `/readyz` pings asynchronously through `Pg::ping`; this is for callers on threads.
        self.pg
            .run("checking", |db| async move {
                db.simple_query("SELECT 1").await.map(drop)
            })
            .map_err(|e| e.to_string())
    }

    fn describe(&self) -> String {
        self.pg.shown().to_owned()
    }
}
