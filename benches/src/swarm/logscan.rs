//! Warnings and errors in the contenders' logs, grouped so a report can quote them.
//!
//! Lines are `tracing`'s default format (`<time>  WARN <spans>: <target>: <message> k=v ...`);
//! lines are grouped by level and message with the timestamp and `key=value` fields dropped,
//! so a thousand "peer disconnected peer=..." lines make one entry with a count.

use std::collections::BTreeMap;

use serde::Serialize;

/// One kind of notable line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notable {
    /// `WARN` or `ERROR`.
    pub level: String,
    /// The line without its time and fields.
    pub message: String,
    /// How many lines had this shape.
    pub count: usize,
    /// The first such line as written.
    pub example: String,
}

/// The level of a log line, if it is a warning or an error.
fn level(line: &str) -> Option<&'static str> {
    let mut words = line.split_whitespace();
    let _time = words.next()?;
    match words.next()? {
        "WARN" => Some("WARN"),
        "ERROR" => Some("ERROR"),
        _ => None,
    }
}

/// Level and message of a line, fields and span fields removed.
fn shape(line: &str) -> String {
    line.split_whitespace()
        .skip(2)
        .filter(|w| !w.contains('='))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Group the warnings and errors of `text`, most frequent first.
pub fn notable(text: &str) -> Vec<Notable> {
    let mut groups: BTreeMap<(String, String), Notable> = BTreeMap::new();
    for line in text.lines() {
        let Some(level) = level(line) else { continue };
        let message = shape(line);
        groups
            .entry((level.to_owned(), message.clone()))
            .and_modify(|n| n.count += 1)
            .or_insert_with(|| Notable {
                level: level.to_owned(),
                message,
                count: 1,
                example: line.chars().take(400).collect(),
            });
    }
    let mut out: Vec<Notable> = groups.into_values().collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then(a.message.cmp(&b.message)));
    out
}

/// Merge groups from several logs (e.g. every leecher's agent).
pub fn merge(all: impl IntoIterator<Item = Notable>) -> Vec<Notable> {
    let mut groups: BTreeMap<(String, String), Notable> = BTreeMap::new();
    for n in all {
        groups
            .entry((n.level.clone(), n.message.clone()))
            .and_modify(|g| g.count += n.count)
            .or_insert(n);
    }
    let mut out: Vec<Notable> = groups.into_values().collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then(a.message.cmp(&b.message)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_message() {
        let log = "\
2025-01-01T00:00:00.000001Z  INFO fbpkg_peer::agent: agent ready socket=/x
2025-01-01T00:00:01.000001Z  WARN torrent{info_hash=ab}: fbpkg_peer::engine::peer: peer timed out peer=198.18.0.2:6881
2025-01-01T00:00:02.000001Z  WARN torrent{info_hash=ab}: fbpkg_peer::engine::peer: peer timed out peer=198.18.0.3:6881
2025-01-01T00:00:03.000001Z ERROR fbpkg_peer::engine: write failed error=\"disk full\"
";
        let n = notable(log);
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].level, "WARN");
        assert_eq!(n[0].count, 2);
        assert_eq!(n[0].message, "fbpkg_peer::engine::peer: peer timed out");
        assert!(n[0].example.ends_with("198.18.0.2:6881"));
        assert_eq!(n[1].level, "ERROR");
        let merged = merge(n.iter().cloned().chain(n.iter().cloned()));
        assert_eq!(merged[0].count, 4);
        assert_eq!(merged[1].count, 2);
    }
}
