//! A publisher's directory as the entries of a tree package.
//!
//! The same walk and link rules as the archive (sorted, regular files, directories and links
//! that stay inside; nothing else), but links are recorded by where they lead from the package
//! root, as BEP 47's `symlink path` has them: `bin/tool -> ../lib/tool` is `lib/tool`. That
//! is computed from the link's text; a `..` that follows a link on the way
//! (`m -> d/l/..`, with `d/l` a link) would lead elsewhere once the link is followed, so such
//! a link is refused with a way out rather than recorded somewhere it does not lead.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use fbpkg_common::metainfo::TreeItem;

use super::{check_links, walk};
use crate::error::{PeerError, Result};

/// The entries of `dir` for [`fbpkg_common::metainfo::Metainfo::build_tree`].
pub fn tree_items(dir: &Path) -> Result<Vec<TreeItem>> {
    let mut items = Vec::new();
    walk(dir, Path::new(""), &mut items)?;
    let targets = check_links(dir, &items)?;
    let links: HashSet<&Path> = targets.keys().map(PathBuf::as_path).collect();
    let mut out = Vec::with_capacity(items.len());
    for item in &items {
        let path = components(&item.rel)?;
        let ft = item.meta.file_type();
        let mode = item.meta.permissions().mode() & 0o777;
        if ft.is_dir() {
            out.push(TreeItem::Dir { path, mode });
        } else if ft.is_file() {
            out.push(TreeItem::File {
                path,
                length: item.meta.len(),
                mode,
            });
        } else if ft.is_symlink() {
            let text = targets.get(&item.rel).ok_or_else(|| {
                PeerError::BadInput(format!(
                    "{} changed while it was read",
                    dir.join(&item.rel).display()
                ))
            })?;
            let target = from_root(&item.rel, text, &links)?;
            out.push(TreeItem::Symlink { path, target });
        } else {
            return Err(PeerError::BadInput(format!(
                "{} is not a regular file, directory or symlink (devices, FIFOs and sockets cannot be packaged)",
                item.rel.display()
            )));
        }
    }
    Ok(out)
}

fn components(rel: &Path) -> Result<Vec<String>> {
    rel.components()
        .map(|c| {
            c.as_os_str().to_str().map(str::to_owned).ok_or_else(|| {
                PeerError::BadInput(format!(
                    "{} is not UTF-8; tree packages hold UTF-8 names only",
                    rel.display()
                ))
            })
        })
        .collect()
}

/// Where the link at `link` with text `text` leads, from the root, by its text.
fn from_root(link: &Path, text: &Path, links: &HashSet<&Path>) -> Result<Vec<String>> {
    let refuse = |why: &str| {
        PeerError::BadInput(format!(
            "symlink {} -> {} {why}; publish this directory with --format tar.zst, which keeps \
             links as written",
            link.display(),
            text.display()
        ))
    };
    let mut at: Vec<&OsStr> = link
        .parent()
        .map(|p| p.components().map(Component::as_os_str).collect())
        .unwrap_or_default();
    let mut through_link = false;
    for c in text.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if through_link {
                    return Err(refuse(
                        "steps out of a symlinked directory with '..', which leads elsewhere once the link is followed",
                    ));
                }
                if at.pop().is_none() {
                    return Err(refuse("leaves the package"));
                }
            }
            Component::Normal(n) => {
                at.push(n);
                if links.contains(at.iter().collect::<PathBuf>().as_path()) {
                    through_link = true;
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("is absolute, so it leaves the package"));
            }
        }
    }
    components(&at.iter().collect::<PathBuf>())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn target_of(items: &[TreeItem], path: &str) -> String {
        items
            .iter()
            .find_map(|i| match i {
                TreeItem::Symlink { path: p, target } if p.join("/") == path => {
                    Some(target.join("/"))
                }
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn links_are_recorded_by_where_they_lead_from_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("v2/bin")).unwrap();
        fs::write(root.join("v2/bin/tool"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("v2/bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("v2", root.join("current")).unwrap();
        std::os::unix::fs::symlink("../../v2/bin/./tool", root.join("v2/bin/again")).unwrap();
        std::os::unix::fs::symlink("current/bin", root.join("bin")).unwrap();
        fs::create_dir(root.join("empty")).unwrap();
        let items = tree_items(root).unwrap();
        assert_eq!(target_of(&items, "current"), "v2");
        assert_eq!(target_of(&items, "v2/bin/again"), "v2/bin/tool");
        assert_eq!(target_of(&items, "bin"), "current/bin");
        assert!(items.contains(&TreeItem::File {
            path: vec!["v2".into(), "bin".into(), "tool".into()],
            length: 10,
            mode: 0o755,
        }));
        assert!(items.contains(&TreeItem::Dir {
            path: vec!["empty".into()],
            mode: 0o755,
        }));
    }

    #[test]
    fn a_dot_dot_after_a_link_is_refused_with_a_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("d/x/y")).unwrap();
        fs::write(root.join("d/x/y/f"), b"1").unwrap();
        std::os::unix::fs::symlink("x/y", root.join("d/l")).unwrap();
        std::os::unix::fs::symlink("d/l/..", root.join("m")).unwrap();
        let err = tree_items(root).unwrap_err().to_string();
        assert!(err.contains("--format tar.zst"), "{err}");
    }
}
