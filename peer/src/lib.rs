//! The fbpkg-rs peer agent, launcher cache and command line.

pub mod cli;
