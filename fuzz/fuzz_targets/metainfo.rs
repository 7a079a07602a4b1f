//! `Metainfo::parse` on arbitrary bytes.
//!
//! Checks, whenever a metainfo is accepted: the piece length is a power of two in range; there
//! is exactly one hash per piece; piece offsets and sizes tile the archive exactly, with no
//! overflow for any piece index (the engine computes them for indexes peers send); the name is
//! a safe file name; the raw bytes are kept as given and parse again to the same metainfo. For a
//! tree package (seed-tree: the fuzzer edits its padding, pieces and piece length, which its
//! identity does not cover): its entries tile the torrent, every path and link is safe, and
//! some file has bytes.
#![no_main]

use fbpkg_common::metainfo::{
    FileKind, Format, MAX_PIECE_LENGTH, MIN_PIECE_LENGTH, Metainfo, check_file_name,
    manifest_sha256,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Metainfo::parse(data) else {
        return;
    };
    assert!(m.length > 0);
    assert!(m.piece_length.is_power_of_two());
    assert!((MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&m.piece_length));
    assert_eq!(m.pieces.len() as u64, m.length.div_ceil(m.piece_length));
    let n = m.num_pieces();
    assert_eq!(n as usize, m.pieces.len());

    let mut end = 0u64;
    for i in 0..n {
        assert_eq!(m.piece_offset(i), end, "piece {i}");
        let size = u64::from(m.piece_size(i));
        assert!(size > 0 && size <= m.piece_length, "piece {i}: {size}");
        if i + 1 < n {
            assert_eq!(size, m.piece_length, "only the last piece may be short");
        }
        end = end
            .checked_add(size)
            .expect("the archive length fits in u64");
    }
    assert_eq!(end, m.length);
    // Indexes a hostile peer may send: past the end, all the way up.
    for i in [n, n.saturating_add(1), u32::MAX / 2, u32::MAX - 1, u32::MAX] {
        assert_eq!(m.piece_size(i), 0, "piece {i} is past the end");
        let _ = m.piece_offset(i);
    }

    check_file_name(m.name.as_bytes()).expect("an accepted name is safe");
    if m.format == Format::Tree {
        // What storage and install rely on: the entries tile the torrent, every path is safe,
        // links take no bytes, and some file has bytes.
        let mut sum = 0u64;
        for f in &m.files {
            sum = sum.checked_add(f.length).expect("entries add up in u64");
            for c in &f.path {
                check_file_name(c.as_bytes()).expect("an accepted path is safe");
            }
            if let FileKind::Symlink { target } = &f.kind {
                assert_eq!(f.length, 0, "a link takes no bytes");
                for c in target {
                    check_file_name(c.as_bytes()).expect("an accepted link target is safe");
                }
            }
        }
        assert_eq!(sum, m.length);
        assert!(m.stored_bytes() > 0);
        assert_eq!(m.sha256, manifest_sha256(&m.files, &m.dirs));
    } else {
        assert!(m.files.is_empty() && m.dirs.is_empty());
    }
    assert_eq!(m.as_bytes(), data);
    assert_eq!(Metainfo::parse(m.as_bytes()).as_ref(), Ok(&m));
});
