//! TLS on both sides of the proxy, with rustls and the `ring` provider.
//!
//! Owns: the acceptor configuration for `ssl://` listeners (PEM chain and key,
//! TLS 1.2 and 1.3) and the connector configuration for `ssl://` upstreams
//! (system roots or a CA file, a pinned SHA-256 fingerprint, or an explicit
//! `insecure` opt-out). It does not open sockets.
//!
//! Resumption is on for listeners: stateless session tickets (TLS 1.3 and
//! 1.2) sealed with keys that rotate every 6 hours (the previous key still
//! opens tickets until the next rotation), plus rustls' in-memory cache for
//! TLS 1.2 session ids. The ticket keys belong to the process, not to one
//! configuration: every configuration built here (at start and at each live
//! reload, new certificate or not) seals and opens tickets with the same
//! keys, so a wallet resumes across reloads. They are not handed to a
//! successor on `--takeover`: after an in-place upgrade every wallet makes
//! one full handshake.

use crate::config::{parse_fingerprint, TlsFiles, UpstreamEntry};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::io::BufReader;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The development certificate shipped in `certs/`; a server using it gets a
/// warning in the log.
const DEV_CERT: &str = include_str!("../certs/server.crt");

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The process's ticket sealer, shared by every listener configuration
/// (see the module's documentation).
fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, String> {
    static TICKETER: OnceLock<Arc<dyn rustls::server::ProducesTickets>> = OnceLock::new();
    if let Some(t) = TICKETER.get() {
        return Ok(t.clone());
    }
    let made =
        rustls::crypto::ring::Ticketer::new().map_err(|e| format!("session tickets: {e}"))?;
    Ok(TICKETER.get_or_init(|| made).clone())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut BufReader::new(file)).collect();
    let certs = certs.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no private key found", path.display()))
}

/// Build the acceptor configuration for `ssl://` listeners.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    if is_dev_certificate(&certs[0]) {
        tracing::warn!(
            cert = %files.cert.display(),
            "serving the shipped development certificate: make your own for production (see certs/README.md)"
        );
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} / {}: {e}", files.cert.display(), files.key.display()))?;
    config.ticketer = ticketer()?;
    Ok(Arc::new(config))
}

fn is_dev_certificate(cert: &CertificateDer<'_>) -> bool {
    let mut reader = BufReader::new(DEV_CERT.as_bytes());
    let found = rustls_pemfile::certs(&mut reader)
        .flatten()
        .any(|dev| dev.as_ref() == cert.as_ref());
    found
}

/// The SHA-256 fingerprint of a DER certificate, as lowercase hex.
pub fn fingerprint_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Build the connector configuration for one `ssl://` upstream.
pub fn client_config(entry: &UpstreamEntry) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let config = if entry.insecure {
        tracing::warn!(upstream = %entry.url, "certificate verification is disabled for this upstream (insecure = true)");
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified {
                pin: None,
                provider: provider(),
            }))
            .with_no_client_auth()
    } else if let Some(fp) = &entry.fingerprint {
        let pin = parse_fingerprint(fp)?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified {
                pin: Some(pin),
                provider: provider(),
            }))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &entry.ca_file {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    tracing::warn!(upstream = %entry.url, "no system root certificates found: this upstream cannot be verified");
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// A verifier that skips the chain and name checks: either everything is
/// accepted (`insecure`), or only the certificate with the pinned
/// fingerprint. Handshake signatures are still verified, so the peer must
/// hold the certificate's key.
#[derive(Debug)]
struct Unverified {
    pin: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.pin {
            None => Ok(ServerCertVerified::assertion()),
            Some(pin) if Sha256::digest(end_entity.as_ref()).as_slice() == pin => {
                Ok(ServerCertVerified::assertion())
            }
            Some(_) => Err(rustls::Error::General(format!(
                "certificate fingerprint {} does not match the pinned one",
                fingerprint_hex(end_entity.as_ref())
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algs)
            .or_else(|_| verify_with_key(message, cert, dss, algs))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algs).or_else(|e| {
            // TLS 1.3 forbids PKCS#1 v1.5 and SHA-1 handshake signatures.
            let allowed = !matches!(
                dss.scheme,
                SignatureScheme::RSA_PKCS1_SHA1
                    | SignatureScheme::RSA_PKCS1_SHA256
                    | SignatureScheme::RSA_PKCS1_SHA384
                    | SignatureScheme::RSA_PKCS1_SHA512
                    | SignatureScheme::ECDSA_SHA1_Legacy
            );
            if allowed {
                verify_with_key(message, cert, dss, algs)
            } else {
                Err(e)
            }
        })
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Check a handshake signature against the certificate's public key alone.
///
/// webpki refuses to read some certificates Electrum servers really use as
/// end-entity certificates: X.509 version 1 (what `openssl x509 -req
/// -signkey`, ElectrumX's documented recipe, makes) and self-signed ones
/// marked CA:TRUE. With a pin or `insecure` the chain is not checked anyway,
/// but the peer must still prove it holds the certificate's key: this does
/// that from the SubjectPublicKeyInfo, read with a minimal DER walk.
fn verify_with_key(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algs: &rustls::crypto::WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let (alg_id, key) = spki_of(cert.as_ref())
        .ok_or_else(|| rustls::Error::General("cannot read the certificate's public key".into()))?;
    let candidates = algs
        .mapping
        .iter()
        .find(|(scheme, _)| *scheme == dss.scheme)
        .map(|(_, a)| *a)
        .ok_or(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ))?;
    for alg in candidates {
        if alg.public_key_alg_id().as_ref() == alg_id {
            return alg
                .verify_signature(key, message, dss.signature())
                .map(|_| HandshakeSignatureValid::assertion())
                .map_err(|_| {
                    rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
                });
        }
    }
    Err(rustls::Error::General(
        "the certificate's key does not match the signature scheme".into(),
    ))
}

/// One DER element: (tag, contents, rest).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *input.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    if end > input.len() {
        return None;
    }
    Some((tag, &input[header..end], &input[end..]))
}

/// The public key of a certificate: (AlgorithmIdentifier contents, key bits).
fn spki_of(cert: &[u8]) -> Option<(&[u8], &[u8])> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, certificate, _) = der_next(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der_next(certificate)? else {
        return None;
    };
    // [0] version (absent in v1), then serial, signature, issuer, validity, subject.
    let (tag, _, mut rest) = der_next(tbs)?;
    let skip = if tag == 0xa0 { 5 } else { 4 };
    for _ in 0..skip {
        rest = der_next(rest)?.2;
    }
    let (SEQUENCE, spki, _) = der_next(rest)? else {
        return None;
    };
    let (SEQUENCE, alg, rest) = der_next(spki)? else {
        return None;
    };
    let (0x03, bits, _) = der_next(rest)? else {
        return None;
    };
    match bits.split_first()? {
        (0, key) => Some((alg, key)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_keys_are_read_from_v1_and_v3_certificates() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for path in ["tests/fixtures/v1.crt", "certs/server.crt"] {
            let cert = &read_certs(&root.join(path)).unwrap()[0];
            let (alg, key) = spki_of(cert.as_ref()).unwrap_or_else(|| panic!("{path}"));
            // rsaEncryption with NULL parameters, and an RSA key (a SEQUENCE).
            assert_eq!(
                &alg[..11],
                &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01]
            );
            assert_eq!(key[0], 0x30, "{path}");
        }
        assert!(spki_of(b"\x30\x03\x02\x01").is_none());
        assert!(spki_of(&[]).is_none());
    }

    #[test]
    fn fingerprints() {
        let hexs = "AB".repeat(32);
        assert_eq!(parse_fingerprint(&hexs).unwrap(), [0xab; 32]);
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint("zz").is_err());
    }

    #[test]
    fn shipped_dev_certificate_loads_and_is_recognised() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let files = TlsFiles {
            cert: root.join("certs/server.crt"),
            key: root.join("certs/server.key"),
        };
        server_config(&files).unwrap();
        assert!(is_dev_certificate(&read_certs(&files.cert).unwrap()[0]));
    }

    #[test]
    fn missing_files_are_named() {
        let files = TlsFiles {
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
        };
        assert!(server_config(&files)
            .unwrap_err()
            .contains("/nonexistent/c.pem"));
    }
}
