//! A progress bar on stderr when it is a terminal; nothing at all on a pipe.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::TorrentStatus;

/// Download progress for one package.
#[derive(Debug)]
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(label: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self { bar: None };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Self { bar: Some(bar) }
    }

    pub fn update(&self, s: &TorrentStatus) {
        if let Some(bar) = &self.bar {
            bar.set_length(s.size);
            bar.set_position(s.bytes_have);
            let msg = match s.phase.as_str() {
                "verifying" => "verifying".to_owned(),
                _ => format!("{} peers ({} seeds)", s.peers, s.seeds),
            };
            bar.set_message(msg);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
