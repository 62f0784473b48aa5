//! Optional HTTP basic auth on the side port.
//!
//! Owns: checking an `Authorization: Basic` header against the `[metrics]`
//! credentials, and which paths stay open without them (`open_paths`: by
//! default `/metrics`, `/healthz` and `/readyz`, which Prometheus and health
//! probes read). Only SHA-256 digests of the user name and password are
//! kept, and they are compared in constant time (`subtle`), so neither the
//! length nor the first wrong byte of a guess shows in the answer's timing.
//!
//! Basic auth sends the password with every request: over plain HTTP it is
//! only as private as the network. The port listens on loopback by default;
//! an operator who exposes it should put a TLS terminator in front.

use crate::config::MetricsConfig;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The credentials in force and the paths open without them.
#[derive(Clone)]
pub struct Auth {
    user: [u8; 32],
    pass: [u8; 32],
    open: Vec<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("open", &self.open).finish()
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl Auth {
    /// The credentials of a checked `[metrics]` table; `None` when it sets
    /// none (everything is open).
    pub fn from_config(c: &MetricsConfig) -> Option<Auth> {
        let user = c.username.as_ref()?;
        let pass = match (&c.password, &c.password_sha256) {
            (Some(p), _) => sha256(p.as_bytes()),
            (None, Some(h)) => hex::decode(h).ok()?.try_into().ok()?,
            (None, None) => return None,
        };
        Some(Auth {
            user: sha256(user.as_bytes()),
            pass,
            open: c.open_paths.clone(),
        })
    }

    /// Whether `path` is served without credentials.
    pub fn is_open(&self, path: &str) -> bool {
        self.open.iter().any(|p| p == path)
    }

    /// Whether an `Authorization` header value carries the credentials.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some((user, pass)) = header.and_then(basic_credentials) else {
            return false;
        };
        let user_ok = sha256(user.as_bytes()).ct_eq(&self.user);
        let pass_ok = sha256(pass.as_bytes()).ct_eq(&self.pass);
        // `&` on `Choice`, not `&&`: both comparisons always run.
        (user_ok & pass_ok).into()
    }
}

/// `Basic base64(user:pass)` -> (user, pass).
fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(header).ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(password: Option<&str>, hash: Option<&str>) -> MetricsConfig {
        MetricsConfig {
            username: Some("ops".into()),
            password: password.map(String::from),
            password_sha256: hash.map(String::from),
            ..MetricsConfig::default()
        }
    }

    fn header(user_pass: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
        .into_bytes()
    }

    #[test]
    fn checks_user_and_password() {
        let a = Auth::from_config(&config(Some("s3cret:x"), None)).unwrap();
        assert!(a.accepts(Some(&header("ops:s3cret:x"))));
        assert!(a.accepts(Some(b"basic b3BzOnMzY3JldDp4")));
        assert!(!a.accepts(Some(&header("ops:s3cret"))));
        assert!(!a.accepts(Some(&header("Ops:s3cret:x"))));
        assert!(!a.accepts(Some(&header("ops"))));
        assert!(!a.accepts(Some(b"Bearer b3BzOnMzY3JldDp4")));
        assert!(!a.accepts(Some(b"Basic !!!")));
        assert!(!a.accepts(None));
    }

    #[test]
    fn a_password_hash_works_like_the_password() {
        let hash = hex::encode(sha256(b"s3cret"));
        let a = Auth::from_config(&config(None, Some(&hash))).unwrap();
        assert!(a.accepts(Some(&header("ops:s3cret"))));
        assert!(!a.accepts(Some(&header(&format!("ops:{hash}")))));
    }

    #[test]
    fn open_paths_default_to_what_prometheus_and_probes_read() {
        assert!(Auth::from_config(&MetricsConfig::default()).is_none());
        let a = Auth::from_config(&config(Some("p"), None)).unwrap();
        for p in ["/metrics", "/healthz", "/readyz"] {
            assert!(a.is_open(p), "{p}");
        }
        for p in ["/", "/status.json", "/anything"] {
            assert!(!a.is_open(p), "{p}");
        }
    }

    #[test]
    fn half_set_credentials_are_rejected_by_name() {
        let mut c = MetricsConfig {
            password: Some("p".into()),
            ..MetricsConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "metrics.username");
        c.username = Some("ops".into());
        assert!(c.validate().is_ok());
        c.password_sha256 = Some("00".repeat(32));
        assert_eq!(c.validate().unwrap_err().0, "metrics.password_sha256");
        c.password = None;
        c.password_sha256 = Some("zz".into());
        assert_eq!(c.validate().unwrap_err().0, "metrics.password_sha256");
        c.password_sha256 = None;
        assert_eq!(c.validate().unwrap_err().0, "metrics.password");
        c.password = Some("p".into());
        c.open_paths = vec!["/secret".into()];
        assert_eq!(c.validate().unwrap_err().0, "metrics.open_paths");
        let shown = format!("{:?}", config(Some("hunter2"), None));
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
