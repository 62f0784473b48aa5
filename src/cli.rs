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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
