//! Symlinks resolved beneath the package root, the way the kernel follows them.
//!
//! Reading a link's target as text is not enough: `d1/d2/l -> ../..` and `m -> d1/d2/l/../..`
//! each read as staying inside (the second as `d1`), but opening `m` follows `l` to the root
//! first, and the last `..` then leaves the package. So each link is resolved here as path
//! lookup does it: components in order, a link met on the way replaced by where it leads, and
//! `..` applied to that.
//!
//! **Policy.** Absolute targets are refused. A link through other links is allowed when every
//! step stays inside (`current -> v2`, `bin -> current/bin`: common in real trees). Loops and
//! chains nested deeper than [`MAX_LINK_DEPTH`] are refused: the kernel gives up on them too,
//! so such a link could only ever fail. A name that is not a link of the package (a directory,
//! a file, a name that does not exist) is taken as a directory. That is stricter than the
//! kernel, which stops at a missing or non-directory component, and never looser.
//!
//! **Order.** Links are checked once the whole tree is known, not one by one as they arrive: a
//! link extracted later can change where an earlier one leads (`m` above may come before `l`).
//! Until then no entry is written through a link (the extractor refuses non-directory parents
//! and opens with `O_NOFOLLOW`), so a link that will be refused has harmed nothing.
//!
//! **Cost.** Each link is resolved once and remembered, with one hash lookup per component of
//! its target: linear in the size of the link targets. Only links and their ancestors are kept.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};

/// Most links nested inside one resolution (Linux's `MAXSYMLINKS`). Also bounds the recursion.
pub(super) const MAX_LINK_DEPTH: u32 = 40;

const ROOT: usize = 0;

/// Why a link cannot stay in a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BadLink {
    /// The link, relative to the package root.
    pub link: PathBuf,
    /// Its target as written.
    pub target: PathBuf,
    /// What is wrong with it.
    pub why: Why,
}

/// What is wrong with a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// The target is an absolute path.
    Absolute,
    /// Following it goes above the package root.
    Escapes,
    /// Following it comes back to itself.
    Loop,
    /// More than [`MAX_LINK_DEPTH`] links nested.
    TooDeep,
    /// It sits beneath another link (the extractor never writes such an entry).
    BeneathLink,
}

impl std::fmt::Display for BadLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match self.why {
            Why::Absolute => "is absolute, so it leaves the package",
            Why::Escapes => "leaves the package once the links on its way are followed",
            Why::Loop => "is a symlink loop",
            Why::TooDeep => "goes through more than 40 nested links",
            Why::BeneathLink => "is beneath another link",
        };
        write!(
            f,
            "symlink {} -> {} {why}",
            self.link.display(),
            self.target.display()
        )
    }
}

/// Where a resolution stands: at `node`, then `below` more names that are not links of the
/// package (none of them can be a link or hold one, since every link's ancestors are nodes).
#[derive(Debug, Clone, Copy)]
struct Place {
    node: usize,
    below: usize,
}

#[derive(Debug)]
enum State {
    /// A directory on the way to a link.
    Dir,
    /// A link not resolved yet.
    Target(PathBuf),
    /// Being resolved: meeting it again is a loop.
    Resolving,
    /// Where it leads.
    Resolved(Place),
}

#[derive(Debug)]
struct Node {
    parent: usize,
    name: OsString,
    children: HashMap<OsString, usize>,
    state: State,
}

/// The links of one package tree and their ancestors.
#[derive(Debug)]
pub(super) struct LinkTree {
    nodes: Vec<Node>,
}

impl LinkTree {
    pub(super) fn new() -> Self {
        Self {
            nodes: vec![Node {
                parent: ROOT,
                name: OsString::new(),
                children: HashMap::new(),
                state: State::Dir,
            }],
        }
    }

    /// Record the link at `rel` (relative, normal components only) pointing at `target`.
    pub(super) fn add(&mut self, rel: &Path, target: &Path) -> Result<(), BadLink> {
        let bad = |why| BadLink {
            link: rel.to_owned(),
            target: target.to_owned(),
            why,
        };
        if target.has_root() {
            return Err(bad(Why::Absolute));
        }
        let mut cur = ROOT;
        for c in rel.components() {
            if !matches!(self.nodes[cur].state, State::Dir) {
                return Err(bad(Why::BeneathLink));
            }
            let name = c.as_os_str();
            cur = match self.nodes[cur].children.get(name) {
                Some(&child) => child,
                None => {
                    let id = self.nodes.len();
                    self.nodes.push(Node {
                        parent: cur,
                        name: name.to_owned(),
                        children: HashMap::new(),
                        state: State::Dir,
                    });
                    self.nodes[cur].children.insert(name.to_owned(), id);
                    id
                }
            };
        }
        // A name already known as a directory on the way to another link cannot also be a
        // link: the extractor refuses duplicates before this, and a walk yields each name once.
        if cur == ROOT || !self.nodes[cur].children.is_empty() {
            return Err(bad(Why::BeneathLink));
        }
        self.nodes[cur].state = State::Target(target.to_owned());
        Ok(())
    }

    /// Resolve every link; the first one that cannot stay in the package, in the order added.
    pub(super) fn check(&mut self) -> Result<(), BadLink> {
        for id in 0..self.nodes.len() {
            if matches!(self.nodes[id].state, State::Target(_)) {
                self.resolve(id, 0).map_err(|why| self.bad_link(id, why))?;
            }
        }
        Ok(())
    }

    fn bad_link(&self, id: usize, why: Why) -> BadLink {
        let mut names: Vec<&OsStr> = Vec::new();
        let mut cur = id;
        while cur != ROOT {
            names.push(&self.nodes[cur].name);
            cur = self.nodes[cur].parent;
        }
        let link: PathBuf = names.iter().rev().collect();
        // `resolve` puts a failed link's target back, so it is there to quote.
        let target = match &self.nodes[id].state {
            State::Target(t) => t.clone(),
            _ => PathBuf::new(),
        };
        BadLink { link, target, why }
    }

    /// Where the link `id` leads, remembering it.
    fn resolve(&mut self, id: usize, depth: u32) -> Result<Place, Why> {
        let target = match &self.nodes[id].state {
            State::Resolved(p) => return Ok(*p),
            State::Resolving => return Err(Why::Loop),
            State::Dir => return Ok(Place { node: id, below: 0 }),
            State::Target(t) => t.clone(),
        };
        if depth >= MAX_LINK_DEPTH {
            return Err(Why::TooDeep);
        }
        self.nodes[id].state = State::Resolving;
        let start = Place {
            node: self.nodes[id].parent,
            below: 0,
        };
        match self.walk(start, &target, depth + 1) {
            Ok(p) => {
                self.nodes[id].state = State::Resolved(p);
                Ok(p)
            }
            Err(why) => {
                // Put the target back so the error can quote it.
                self.nodes[id].state = State::Target(target);
                Err(why)
            }
        }
    }

    fn walk(&mut self, mut at: Place, target: &Path, depth: u32) -> Result<Place, Why> {
        for c in target.components() {
            match c {
                Component::RootDir | Component::Prefix(_) => return Err(Why::Absolute),
                Component::CurDir => {}
                Component::ParentDir => {
                    if at.below > 0 {
                        at.below -= 1;
                    } else if at.node == ROOT {
                        return Err(Why::Escapes);
                    } else {
                        at.node = self.nodes[at.node].parent;
                    }
                }
                Component::Normal(name) => {
                    if at.below > 0 {
                        at.below += 1;
                    } else {
                        match self.nodes[at.node].children.get(name) {
                            Some(&child) => at = self.resolve(child, depth)?,
                            None => at.below = 1,
                        }
                    }
                }
            }
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(links: &[(&str, &str)]) -> Result<(), BadLink> {
        let mut t = LinkTree::new();
        for (link, target) in links {
            t.add(Path::new(link), Path::new(target))?;
        }
        t.check()
    }

    fn why(links: &[(&str, &str)]) -> Option<Why> {
        check(links).err().map(|b| b.why)
    }

    #[test]
    fn a_link_through_a_link_that_climbs_is_refused_in_either_order() {
        let chain = [("d1/d2/l", "../.."), ("m", "d1/d2/l/../..")];
        assert_eq!(why(&chain), Some(Why::Escapes));
        let reversed = [("m", "d1/d2/l/../.."), ("d1/d2/l", "../..")];
        let err = check(&reversed).unwrap_err();
        assert_eq!(err.why, Why::Escapes);
        assert_eq!(err.link, Path::new("m"));
        assert_eq!(err.target, Path::new("d1/d2/l/../.."));
        // `l` alone is fine: it leads to the root.
        assert_eq!(why(&[("d1/d2/l", "../..")]), None);
    }

    #[test]
    fn link_to_link_to_outside_is_refused() {
        assert_eq!(why(&[("a", "b"), ("b", "c/../..")]), Some(Why::Escapes));
        assert_eq!(why(&[("x/a", "../b/c"), ("b", "..")]), Some(Why::Escapes));
        // Through a directory link placed deep: `up` leads to the root, one more `..` escapes.
        assert_eq!(
            why(&[("p/q/up", "../.."), ("p/q/r", "up/..")]),
            Some(Why::Escapes)
        );
    }

    #[test]
    fn absolute_targets_loops_and_deep_chains_are_refused() {
        assert_eq!(why(&[("a", "/etc")]), Some(Why::Absolute));
        assert_eq!(why(&[("a", "a")]), Some(Why::Loop));
        assert_eq!(why(&[("a", "b"), ("b", "a")]), Some(Why::Loop));
        assert_eq!(why(&[("d/a", "../d/a/x")]), Some(Why::Loop));
        let mut chain: Vec<(String, String)> = (0..41)
            .map(|i| (format!("l{i}"), format!("l{}", i + 1)))
            .collect();
        chain.push(("l41".into(), "target".into()));
        let refs: Vec<(&str, &str)> = chain
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(why(&refs), Some(Why::TooDeep));
        assert_eq!(why(&refs[refs.len() - 30..]), None, "30 deep is fine");
    }

    #[test]
    fn links_through_links_that_stay_inside_are_allowed() {
        assert_eq!(
            why(&[
                ("current", "v2"),
                ("bin", "current/bin"),
                ("v2/bin/tool", "../lib/x")
            ]),
            None
        );
        assert_eq!(
            why(&[
                ("lib/libfoo.so", "libfoo.so.1"),
                ("lib/libfoo.so.1", "libfoo.so.1.2")
            ]),
            None
        );
        // Climbs back to the root through a link, then down again: inside.
        assert_eq!(why(&[("d1/d2/l", "../.."), ("m", "d1/d2/l/d1")]), None);
        // Names that do not exist are taken as directories: `x/..` is the root.
        assert_eq!(why(&[("a", "x/../b")]), None);
        assert_eq!(why(&[("a", "x/../../b")]), Some(Why::Escapes));
        assert_eq!(why(&[("e/a", "./../f")]), None);
    }

    #[test]
    fn nothing_sits_beneath_a_link() {
        assert_eq!(why(&[("a", "d"), ("a/b", "x")]), Some(Why::BeneathLink));
        assert_eq!(why(&[("a/b", "x"), ("a", "d")]), Some(Why::BeneathLink));
    }
}
