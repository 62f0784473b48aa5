//! Command-line arguments.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;

/// A multi-coin Electrum load-balancing proxy.
#[derive(Debug, Parser)]
#[command(name = "electrum-lb", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = "config/electrum-lb.toml")]
    pub config: PathBuf,
    /// Validate the configuration and exit (0 when valid, 2 otherwise).
    #[arg(long)]
    pub check: bool,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// In-place upgrade: once this process's upstreams are ready, take the
    /// listening sockets over from the instance serving `[server]
    /// handoff_socket`, which then drains and exits. Binds afresh when no
    /// instance answers there.
    #[arg(long)]
    pub takeover: bool,
    /// With --takeover: seconds to wait for a healthy upstream per coin
    /// before giving up (the running instance keeps serving).
    #[arg(long, default_value_t = 30)]
    pub takeover_wait: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
