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
    /// Worker threads (0: automatic: one on a machine with 2 CPUs or fewer,
    /// else one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// One single-threaded runtime per worker thread (`--threads`, or one
    /// per CPU) instead of one multi-threaded runtime: connections are
    /// dealt out to them in turn, and each sends its requests to upstream
    /// connections of its own thread (README "Performance").
    #[arg(long)]
    pub per_core: bool,
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

impl Cli {
    /// How many threads the runtime gets: `--threads`, or the automatic
    /// choice for `cpus`.
    pub fn runtime_threads(&self, cpus: usize) -> usize {
        match (self.threads, self.per_core) {
            (0, true) => cpus,
            (0, false) => auto_threads(cpus),
            (n, _) => n,
        }
    }
}

/// The automatic runtime size. Measured on a 2-core machine with the load
/// generator and upstreams beside the proxy (README "Performance"): a
/// second worker thread costs 15-25% more CPU per request (cross-thread
/// wake-ups between session, connection and hub tasks) and serves no more
/// requests, because the proxy never has a core to itself there. With more
/// cores, one worker per CPU.
pub fn auto_threads(cpus: usize) -> usize {
    if cpus <= 2 {
        1
    } else {
        cpus
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_on_small_machines_one_per_cpu_above() {
        assert_eq!(auto_threads(1), 1);
        assert_eq!(auto_threads(2), 1);
        assert_eq!(auto_threads(4), 4);
        let per_core = Cli::parse_from(["electrum-lb", "--per-core"]);
        assert_eq!(per_core.runtime_threads(2), 2);
        let explicit = Cli::parse_from(["electrum-lb", "--threads", "3"]);
        assert_eq!(explicit.runtime_threads(2), 3);
        let auto = Cli::parse_from(["electrum-lb"]);
        assert_eq!(auto.runtime_threads(2), 1);
        assert_eq!(auto.runtime_threads(8), 8);
    }
}
