//! Command-line options and the upstream cost models.

use std::time::Duration;

pub(crate) struct Options {
    pub(crate) secs: f64,
    pub(crate) rounds: usize,
    pub(crate) sessions: usize,
    /// Parts to run (`--only uncached,light`): all when empty.
    pub(crate) only: Vec<String>,
    /// Paths to run (`--paths haproxy,electrum-lb`, names as in the
    /// table's rows): all when empty.
    pub(crate) paths: Vec<String>,
    /// What the mock upstreams cost per request; one table section each.
    pub(crate) models: Vec<Model>,
    /// The fixed rates of part `rate`, requests per second
    /// (`--rate 5000,20000`); one table each.
    pub(crate) rates: Vec<f64>,
}

impl Options {
    pub(crate) fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }

    pub(crate) fn wants_path(&self, name: &str) -> bool {
        self.paths.is_empty() || self.names_path(name)
    }

    /// Whether `--paths` names this row (opt-in rows run only then).
    pub(crate) fn names_path(&self, name: &str) -> bool {
        self.paths.iter().any(|p| p == name)
    }
}

impl Options {
    pub(crate) fn from_args() -> Options {
        let mut o = Options {
            secs: 3.0,
            rounds: 3,
            sessions: 10_000,
            only: Vec::new(),
            paths: Vec::new(),
            models: vec![Model::Flat(0), Model::ElectrumX],
            rates: vec![20_000.0],
        };
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let Some(v) = value("--secs") {
            o.secs = v.max(1.0);
        }
        if let Some(v) = value("--rounds") {
            o.rounds = (v as usize).max(1);
        }
        if let Some(v) = value("--sessions") {
            o.sessions = v as usize;
        }
        if let Some(v) = value("--upstream-us") {
            o.models = vec![Model::Flat(v as u64)];
        }
        if let Some(i) = args.iter().position(|a| a == "--upstream") {
            o.models = match args.get(i + 1).map(String::as_str) {
                Some("lean") => vec![Model::Flat(0)],
                Some("electrumx") => vec![Model::ElectrumX],
                _ => o.models,
            };
        }
        let list = |name: &str| -> Vec<String> {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .map(|v| v.split(',').map(str::to_string).collect())
                .unwrap_or_default()
        };
        o.only = list("--only");
        o.paths = list("--paths");
        let rates: Vec<f64> = list("--rate")
            .iter()
            .filter_map(|r| r.parse().ok())
            .filter(|r| *r > 0.0)
            .collect();
        if !rates.is_empty() {
            o.rates = rates;
        }
        o
    }
}

/// How much CPU a mock upstream spends on each request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Model {
    /// The same for every method (`Flat(0)`: the lean mock, which answers
    /// from precomputed text as cheaply as a cache hit costs the proxy).
    Flat(u64),
    /// What a real ElectrumX 2.0 spends, per method, as measured by
    /// `interop/upstream_cost.py` on this kind of machine (see [`electrumx_us`]).
    ElectrumX,
}

impl Model {
    pub(crate) fn name(self) -> String {
        match self {
            Model::Flat(0) => "lean".into(),
            Model::Flat(n) => format!("{n} us"),
            Model::ElectrumX => "ElectrumX".into(),
        }
    }

    /// How the mock child process is told (its environment).
    pub(crate) fn env(self) -> String {
        match self {
            Model::Flat(n) => n.to_string(),
            Model::ElectrumX => "electrumx".into(),
        }
    }

    pub(crate) fn from_env(v: &str) -> Model {
        match v {
            "electrumx" => Model::ElectrumX,
            n => Model::Flat(n.parse().unwrap_or(0)),
        }
    }

    pub(crate) fn cost(self, method: &str) -> Duration {
        Duration::from_micros(match self {
            Model::Flat(n) => n,
            Model::ElectrumX => electrumx_us(method),
        })
    }

    pub(crate) fn describe(self) -> String {
        match self {
            Model::Flat(0) => "lean mock upstreams (precomputed answers, ~2 us of CPU per request)".into(),
            Model::Flat(n) => format!("mock upstreams spending {n} us of CPU per request"),
            Model::ElectrumX => "mock upstreams spending what ElectrumX 2.0 spends per method (interop/upstream_cost.py): history 78 us, balance 160, header 128, transaction.get 415, anything else 52".into(),
        }
    }
}

/// CPU microseconds ElectrumX 2.0 spent per request, medians of three runs
/// of `interop/upstream_cost.py` on a 2-core machine of this kind (regtest,
/// everything in the page cache, Python 3.11, no uvloop). The lower figure
/// wherever there was a choice, so that the upstream looks as cheap as it
/// can: histories as served from ElectrumX's own cache (179 us when it
/// misses), `transaction.get` without the node's share (another 146 us),
/// and methods not measured at the floor (`server.ping`, 52 us).
pub(crate) fn electrumx_us(method: &str) -> u64 {
    match method {
        "blockchain.scripthash.get_history" => 78,
        "blockchain.scripthash.get_balance" => 160,
        "blockchain.block.header" | "blockchain.block.headers" => 128,
        "blockchain.transaction.get" => 415,
        _ => 52,
    }
}
