//! Electrum protocol versions and the per-session negotiation.
//!
//! Owns: parsing version strings, the range the proxy offers, and what a
//! `server.version` request settles for a session. Which reply *forms* a
//! level implies (deserialized headers, address methods) is decided where
//! those replies are built; this module only names the level.
//!
//! Rules (the legacy-wallets issue stands over ElectrumX here): anything at
//! or below the proxy's maximum (1.7) is served; below 1.3 the session is
//! legacy; a client whose minimum is above the maximum is refused and
//! disconnected; a repeated `server.version` is a keep-alive and gets the
//! same answer again. A session keeps the level it settled: from 1.6 on it
//! gets the 1.6 reply shapes and loses the methods 1.6 removed, from 1.7 on
//! the 1.7 ones (see `router` and `bridge`), exactly as ElectrumX 2.0 does.

use crate::jsonrpc::{ErrorCode, RpcError};
use serde_json::Value;
use std::fmt;

/// A protocol version such as 1.4.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    pub const fn new(major: u32, minor: u32) -> Self {
        Version(major, minor, 0)
    }

    /// One number that orders like the version (for an atomic); parts are
    /// capped at 999.
    pub fn to_u32(self) -> u32 {
        let part = |p: u32| p.min(999);
        part(self.0) * 1_000_000 + part(self.1) * 1_000 + part(self.2)
    }

    pub fn from_u32(n: u32) -> Version {
        Version(n / 1_000_000, n / 1_000 % 1_000, n % 1_000)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.2 == 0 {
            write!(f, "{}.{}", self.0, self.1)
        } else {
            write!(f, "{}.{}.{}", self.0, self.1, self.2)
        }
    }
}

impl std::str::FromStr for Version {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.trim().split('.');
        let mut next = |required: bool| -> Result<u32, ()> {
            match parts.next() {
                Some(p)
                    if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() < 6 =>
                {
                    p.parse().map_err(|_| ())
                }
                Some(_) => Err(()),
                None if required => Err(()),
                None => Ok(0),
            }
        };
        let v = Version(next(true)?, next(false)?, next(false)?);
        if parts.next().is_some() {
            return Err(());
        }
        Ok(v)
    }
}

/// Lowest version advertised in `server.features`.
pub const PROTOCOL_MIN: Version = Version(1, 0, 0);
/// Highest version the proxy serves (ElectrumX 2.0's maximum).
pub const PROTOCOL_MAX: Version = Version(1, 7, 0);
/// 1.6: `blockchain.block.headers` lists, no `blockchain.relayfee`,
/// `mempool.get_info`, `blockchain.transaction.broadcast_package`.
pub const V1_6: Version = Version(1, 6, 0);
/// 1.7: `blockchain.scriptpubkey.*` instead of `blockchain.scripthash.*`,
/// `blockchain.outpoint.*`, `testmempoolaccept`, `mempool.recent`, the new
/// `server.ping`.
pub const V1_7: Version = Version(1, 7, 0);
/// From this version on, a session gets the modern reply forms.
pub const MODERN_FROM: Version = Version(1, 3, 0);
/// From this version on, `server.version` answers `[software, version]`.
const PAIR_REPLY_FROM: Version = Version(1, 1, 0);

/// What the session has settled about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// No `server.version` yet: replies must be readable by modern clients
    /// that skip negotiation and by legacy wallets that never send it.
    Unnegotiated,
    /// Negotiated below 1.3: deserialized headers, address methods.
    Legacy(Version),
    /// Negotiated 1.3 or later: exactly the modern forms.
    Modern(Version),
}

impl Level {
    pub fn from_version(v: Version) -> Level {
        if v >= MODERN_FROM {
            Level::Modern(v)
        } else {
            Level::Legacy(v)
        }
    }

    pub fn version(self) -> Option<Version> {
        match self {
            Level::Unnegotiated => None,
            Level::Legacy(v) | Level::Modern(v) => Some(v),
        }
    }

    /// Whether the session negotiated `v` or later.
    pub fn at_least(self, v: Version) -> bool {
        self.version().is_some_and(|own| own >= v)
    }
}

/// The outcome of a `server.version` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiated {
    /// Reply with this result JSON; the session's level becomes `level`.
    Accept { level: Level, result: String },
    /// Reply with this error; disconnect when `disconnect` is set.
    Refuse { error: RpcError, disconnect: bool },
}

/// The JSON text `server.version` answers for a negotiated version.
pub fn version_result(server_name: &str, v: Version) -> String {
    if v < PAIR_REPLY_FROM {
        serde_json::to_string(server_name).expect("string serializes")
    } else {
        serde_json::to_string(&(server_name, v.to_string())).expect("pair serializes")
    }
}

fn parse_one(v: &Value) -> Result<Version, RpcError> {
    let bad = || {
        RpcError::new(
            ErrorCode::BadRequest,
            format!("invalid protocol version: {v}"),
        )
    };
    match v {
        Value::String(s) => s.parse().map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// Settle a `server.version` request given the params text and the level the
/// session already has.
pub fn negotiate(params: &str, current: Level, server_name: &str) -> Negotiated {
    // A repeated request is a keep-alive: answer with what was settled.
    if let Some(v) = current.version() {
        return Negotiated::Accept {
            level: current,
            result: version_result(server_name, v),
        };
    }
    let refuse = |error: RpcError| Negotiated::Refuse {
        error,
        disconnect: false,
    };
    let requested: Option<Value> = match serde_json::from_str::<Value>(params) {
        Ok(Value::Array(mut items)) => {
            if items.len() >= 2 {
                Some(items.swap_remove(1))
            } else {
                None
            }
        }
        Ok(Value::Object(mut map)) => map.remove("protocol_version"),
        _ => return refuse(RpcError::new(ErrorCode::InvalidParams, "invalid params")),
    };
    let (client_min, client_max) = match requested {
        // ElectrumX takes a missing version as its lowest; the oldest clients
        // that omit it are the legacy ones.
        None | Some(Value::Null) => (Version::new(1, 0), Version::new(1, 0)),
        Some(Value::Array(pair)) if pair.len() == 2 => {
            match (parse_one(&pair[0]), parse_one(&pair[1])) {
                (Ok(a), Ok(b)) if a <= b => (a, b),
                (Ok(_), Ok(_)) => {
                    return refuse(RpcError::new(
                        ErrorCode::BadRequest,
                        "invalid protocol version range: minimum above maximum",
                    ))
                }
                (Err(e), _) | (_, Err(e)) => return refuse(e),
            }
        }
        Some(v @ Value::String(_)) => match parse_one(&v) {
            Ok(v) => (v, v),
            Err(e) => return refuse(e),
        },
        Some(other) => {
            return refuse(RpcError::new(
                ErrorCode::BadRequest,
                format!("invalid protocol version: {other}"),
            ))
        }
    };
    // A bare version is both the client's minimum and maximum (ElectrumX's
    // rule): "1.8" alone asks for semantics this proxy does not know, which
    // answering 1.7 would silently break, so it is refused like any minimum
    // above ours. Below our minimum nothing is refused: those are the legacy
    // wallets this proxy keeps working.
    if client_min > PROTOCOL_MAX {
        return Negotiated::Refuse {
            error: RpcError::new(
                ErrorCode::BadRequest,
                format!("unsupported protocol version: {client_min} (this server speaks up to {PROTOCOL_MAX})"),
            ),
            disconnect: true,
        };
    }
    let chosen = client_max.min(PROTOCOL_MAX);
    let level = Level::from_version(chosen);
    Negotiated::Accept {
        level,
        result: version_result(server_name, chosen),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "electrum-lb 0.1.0";

    fn accept(params: &str) -> (Level, String) {
        match negotiate(params, Level::Unnegotiated, NAME) {
            Negotiated::Accept { level, result } => (level, result),
            other => panic!("{params}: {other:?}"),
        }
    }

    fn refuse(params: &str) -> (ErrorCode, bool) {
        match negotiate(params, Level::Unnegotiated, NAME) {
            Negotiated::Refuse { error, disconnect } => (error.code, disconnect),
            other => panic!("{params}: {other:?}"),
        }
    }

    #[test]
    fn parse_versions() {
        assert_eq!("1.4.2".parse(), Ok(Version(1, 4, 2)));
        assert_eq!("0.9".parse(), Ok(Version(0, 9, 0)));
        assert_eq!("1".parse(), Ok(Version(1, 0, 0)));
        assert!("1.x".parse::<Version>().is_err());
        assert!("".parse::<Version>().is_err());
        assert!("1.2.3.4".parse::<Version>().is_err());
    }

    #[test]
    fn pre_1_0_is_legacy_with_a_plain_string() {
        assert_eq!(
            accept(r#"["wallet","0.9"]"#),
            (Level::Legacy(Version(0, 9, 0)), format!("\"{NAME}\""))
        );
        assert_eq!(
            accept(r#"["wallet","1.0"]"#),
            (Level::Legacy(Version(1, 0, 0)), format!("\"{NAME}\""))
        );
    }

    #[test]
    fn legacy_from_1_1_gets_a_pair() {
        assert_eq!(
            accept(r#"["w","1.2"]"#),
            (
                Level::Legacy(Version(1, 2, 0)),
                format!("[\"{NAME}\",\"1.2\"]")
            )
        );
    }

    #[test]
    fn ranges_pick_the_highest_common() {
        assert_eq!(
            accept(r#"["w",["1.1","1.4"]]"#).0,
            Level::Modern(Version(1, 4, 0))
        );
        assert_eq!(
            accept(r#"["", ["1.4", "1.6"]]"#),
            (
                Level::Modern(Version(1, 6, 0)),
                format!("[\"{NAME}\",\"1.6\"]")
            )
        );
        assert_eq!(
            accept(r#"["w",["1.4","1.9"]]"#),
            (
                Level::Modern(Version(1, 7, 0)),
                format!("[\"{NAME}\",\"1.7\"]")
            )
        );
        assert_eq!(
            accept(r#"["w","1.4.2"]"#).0,
            Level::Modern(Version(1, 4, 2))
        );
        assert_eq!(accept(r#"["w","1.6"]"#).0, Level::Modern(Version(1, 6, 0)));
        // A single version above the maximum is a client whose minimum is
        // above ours only if it is its minimum too: "1.8" alone is min=max=1.8.
        assert_eq!(refuse(r#"["w","1.8"]"#), (ErrorCode::BadRequest, true));
    }

    #[test]
    fn minimum_above_maximum_is_refused_and_disconnected() {
        assert_eq!(
            refuse(r#"["w",["1.8","1.9"]]"#),
            (ErrorCode::BadRequest, true)
        );
    }

    #[test]
    fn levels_compare() {
        let l = accept(r#"["w","1.6"]"#).0;
        assert!(l.at_least(V1_6) && !l.at_least(V1_7));
        assert!(!Level::Unnegotiated.at_least(Version::new(1, 0)));
        assert!(Level::Legacy(Version(0, 9, 0)).at_least(Version(0, 9, 0)));
        for v in [
            Version(1, 4, 2),
            Version(0, 9, 0),
            V1_7,
            Version(12, 345, 6),
        ] {
            assert_eq!(Version::from_u32(v.to_u32()), v);
        }
        assert!(Version(1, 4, 2).to_u32() < V1_6.to_u32());
    }

    #[test]
    fn malformed_versions_are_errors_without_disconnect() {
        assert_eq!(refuse(r#"["w",14]"#), (ErrorCode::BadRequest, false));
        assert_eq!(refuse(r#"["w","one"]"#), (ErrorCode::BadRequest, false));
        assert_eq!(
            refuse(r#"["w",["1.4","1.2"]]"#),
            (ErrorCode::BadRequest, false)
        );
        assert_eq!(refuse(r#""x""#), (ErrorCode::InvalidParams, false));
    }

    #[test]
    fn missing_version_and_named_params() {
        assert_eq!(accept(r#"[]"#).0, Level::Legacy(Version(1, 0, 0)));
        assert_eq!(
            accept(r#"{"client_name":"x","protocol_version":"1.4"}"#).0,
            Level::Modern(Version(1, 4, 0))
        );
    }

    /// Every case the legacy-wallets issue lists, with the exact answer.
    #[test]
    fn the_issue_cases() {
        let pair = |v: &str| format!("[\"{NAME}\",\"{v}\"]");
        let plain = format!("\"{NAME}\"");
        let cases = [
            (
                r#"["w","0.9"]"#,
                Level::Legacy(Version(0, 9, 0)),
                plain.clone(),
            ),
            (
                r#"["w","1.0"]"#,
                Level::Legacy(Version(1, 0, 0)),
                plain.clone(),
            ),
            (
                r#"["w","1.2"]"#,
                Level::Legacy(Version(1, 2, 0)),
                pair("1.2"),
            ),
            (
                r#"["w",["1.1","1.4"]]"#,
                Level::Modern(Version(1, 4, 0)),
                pair("1.4"),
            ),
            (
                r#"["w","1.4.2"]"#,
                Level::Modern(Version(1, 4, 2)),
                pair("1.4.2"),
            ),
            // BDK's electrum-client 0.25.
            (
                r#"["",["1.4","1.6"]]"#,
                Level::Modern(Version(1, 6, 0)),
                pair("1.6"),
            ),
            // The Electrum wallet of late 2025.
            (r#"["w",["1.4","1.6"]]"#, Level::Modern(V1_6), pair("1.6")),
            (r#"["w",["1.4","1.7"]]"#, Level::Modern(V1_7), pair("1.7")),
            // A legacy range entirely below our minimum is still served.
            (
                r#"["w",["0.8","0.9"]]"#,
                Level::Legacy(Version(0, 9, 0)),
                plain.clone(),
            ),
            (
                r#"["w",["1.0","1.2"]]"#,
                Level::Legacy(Version(1, 2, 0)),
                pair("1.2"),
            ),
            // Extra arguments are tolerated (protocol 1.6 requires it).
            (
                r#"["w","1.4","x"]"#,
                Level::Modern(Version(1, 4, 0)),
                pair("1.4"),
            ),
            // A null version is a missing one.
            (
                r#"["w",null]"#,
                Level::Legacy(Version(1, 0, 0)),
                plain.clone(),
            ),
        ];
        for (params, level, result) in cases {
            assert_eq!(accept(params), (level, result), "{params}");
        }
        // "1.8" alone is min = max = 1.8: above our maximum, refused and closed.
        for params in [r#"["w","1.8"]"#, r#"["w",["1.8","1.9"]]"#, r#"["w","2.0"]"#] {
            assert_eq!(refuse(params), (ErrorCode::BadRequest, true), "{params}");
            let Negotiated::Refuse { error, .. } = negotiate(params, Level::Unnegotiated, NAME)
            else {
                unreachable!()
            };
            assert!(error.message.contains("1.7"), "{}", error.message);
        }
        // Non-strings are errors the session survives.
        for params in [
            r#"["w",14]"#,
            r#"["w",1.4]"#,
            r#"["w",true]"#,
            r#"["w",{"v":"1.4"}]"#,
            r#"["w",["1.4",1.6]]"#,
            r#"["w",["1.4"]]"#,
        ] {
            assert_eq!(refuse(params), (ErrorCode::BadRequest, false), "{params}");
        }
    }

    #[test]
    fn a_failed_negotiation_leaves_the_session_unnegotiated() {
        // The session's level only changes on Accept, so the next call
        // negotiates afresh rather than replaying a keep-alive.
        assert!(matches!(
            negotiate(r#"["w",14]"#, Level::Unnegotiated, NAME),
            Negotiated::Refuse { .. }
        ));
        assert_eq!(accept(r#"["w","0.9"]"#).0, Level::Legacy(Version(0, 9, 0)));
    }

    #[test]
    fn repeated_call_is_a_keep_alive() {
        let level = Level::Legacy(Version(0, 9, 0));
        assert_eq!(
            negotiate(r#"["w","1.4"]"#, level, NAME),
            Negotiated::Accept {
                level,
                result: format!("\"{NAME}\"")
            }
        );
        let level = Level::Modern(Version(1, 4, 0));
        assert_eq!(
            negotiate(r#"["w",["1.8","1.9"]]"#, level, NAME),
            Negotiated::Accept {
                level,
                result: format!("[\"{NAME}\",\"1.4\"]")
            }
        );
        // Whatever the repeated call carries, even garbage or a version the
        // first call would have refused, it never errs nor disconnects.
        let level = Level::Legacy(Version(1, 2, 0));
        for params in [
            r#"["w","0.9"]"#,
            r#"["w","1.6"]"#,
            r#"["w",14]"#,
            "{}",
            "[]",
        ] {
            assert_eq!(
                negotiate(params, level, NAME),
                Negotiated::Accept {
                    level,
                    result: format!("[\"{NAME}\",\"1.2\"]")
                },
                "{params}"
            );
        }
    }
}
