//! Which peers an announce gets back, in O(numwant) whatever the swarm's size.
//!
//! A leecher gets seeders first, up to half the answer (all of them when there are that few),
//! then leechers, then more seeders if the leechers ran short. Why: a package starts with one
//! seed among thousands of leechers; drawn uniformly, the seed would be in few answers, and
//! anyone able to add peers (up to the per-address limit, from many addresses) could push it
//! out of all of them. A seeder gets only leechers. Nobody gets its own entry.
//!
//! Within a role, peers are drawn from the asker's closest zone bucket first (same rack), then
//! the next (same datacenter), then from everyone, uniformly at random within each level.

use fbpkg_common::tracker_proto::{PeerEntry, Zone};
use rand::seq::SliceRandom;

use super::zones::prefixes_longest_first;
use super::{PeerKey, Role, Swarm};

/// Where to draw from: a zone bucket (positions), or a whole role vector.
#[derive(Clone, Copy)]
enum Pool<'a> {
    Bucket(&'a [usize]),
    All(usize),
}

impl Pool<'_> {
    fn len(self) -> usize {
        match self {
            Pool::Bucket(b) => b.len(),
            Pool::All(n) => n,
        }
    }
    fn at(self, i: usize) -> usize {
        match self {
            Pool::Bucket(b) => b.get(i).copied().unwrap_or(usize::MAX),
            Pool::All(_) => i,
        }
    }
}

impl Swarm {
    /// Up to `n` peers for `asker` (see the module doc for which). `asker_seeds` says whether
    /// the asker is a seeder; `zone` is the asker's.
    pub fn sample(
        &self,
        asker: &PeerKey,
        asker_seeds: bool,
        zone: Option<&Zone>,
        n: usize,
    ) -> Vec<PeerEntry> {
        let mut rng = rand::rng();
        let mut picked = Vec::with_capacity(n);
        if asker_seeds {
            self.fill(Role::Leecher, asker, zone, n, &mut picked, &mut rng);
        } else {
            self.fill(
                Role::Seeder,
                asker,
                zone,
                n.div_ceil(2),
                &mut picked,
                &mut rng,
            );
            self.fill(Role::Leecher, asker, zone, n, &mut picked, &mut rng);
            self.fill(Role::Seeder, asker, zone, n, &mut picked, &mut rng);
        }
        picked
            .into_iter()
            .filter_map(|(role, i)| self.group(role).get(i))
            .map(|p| PeerEntry {
                addr: p.addr,
                peer_id: Some(p.peer_id),
            })
            .collect()
    }

    /// Add peers of `role` to `picked` until it holds `upto` or the role has no more: closest
    /// zone bucket first, never the asker, never one already picked.
    fn fill(
        &self,
        role: Role,
        asker: &PeerKey,
        zone: Option<&Zone>,
        upto: usize,
        picked: &mut Vec<(Role, usize)>,
        rng: &mut impl rand::Rng,
    ) {
        let peers = self.group(role);
        let levels = zone
            .into_iter()
            .flat_map(prefixes_longest_first)
            .map(|p| Pool::Bucket(peers.bucket(p)))
            .chain(std::iter::once(Pool::All(peers.len())));
        for pool in levels {
            let Some(need) = upto.checked_sub(picked.len()).filter(|&n| n > 0) else {
                return;
            };
            // Draw enough that, after dropping the asker and the peers of this role picked
            // already (closer buckets are inside this one), `need` are left when there are.
            let already = picked.iter().filter(|(r, _)| *r == role).count();
            let draw = (need + already + 1).min(pool.len());
            let mut fresh: Vec<usize> = floyd_sample(rng, pool.len(), draw)
                .into_iter()
                .map(|i| pool.at(i))
                .filter(|&i| peers.get(i).is_some_and(|p| p.key() != *asker))
                .filter(|&i| already == 0 || !picked.contains(&(role, i)))
                .collect();
            // Floyd's set is uniform but its order is not.
            fresh.shuffle(rng);
            picked.extend(fresh.into_iter().take(need).map(|i| (role, i)));
        }
    }
}

/// `k` distinct indices below `n`, uniformly (Floyd's algorithm): O(k^2) comparisons and one
/// k-sized allocation, never O(n) — `numwant` is small and swarms can be large.
pub(super) fn floyd_sample(rng: &mut impl rand::Rng, n: usize, k: usize) -> Vec<usize> {
    if k >= n {
        return (0..n).collect();
    }
    let mut out: Vec<usize> = Vec::with_capacity(k);
    for j in n - k..n {
        let t = rand::RngExt::random_range(rng, 0..=j);
        if out.contains(&t) {
            out.push(j);
        } else {
            out.push(t);
        }
    }
    out
}
