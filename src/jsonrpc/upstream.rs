//! Lines from an upstream server: responses to the proxy's own ids and
//! notifications, as [`UpstreamMessage`]s borrowing from the line. The
//! usual answer (ElectrumX's or Fulcrum's member order) is read by
//! position with its result checked by `valid`; everything else goes
//! through serde_json.

use super::{Json, LineError};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// One message from an upstream server.
#[derive(Debug)]
pub enum UpstreamMessage<'a> {
    Response {
        id: u64,
        outcome: Result<Json<'a>, Json<'a>>,
    },
    Notification {
        method: Cow<'a, str>,
        params: Option<&'a RawValue>,
    },
    /// A response whose id is not one of ours (e.g. `null` after a parse error).
    Unmatched,
}

#[derive(Deserialize)]
struct RawUpstream<'a> {
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    params: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "super::present")]
    result: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "super::present")]
    error: Option<&'a RawValue>,
    #[serde(default)]
    #[allow(dead_code)]
    jsonrpc: IgnoredAny,
}

fn classify_upstream(raw: RawUpstream<'_>) -> UpstreamMessage<'_> {
    if let Some(method) = raw.method {
        if raw.id.is_none() {
            return UpstreamMessage::Notification {
                method,
                params: raw.params,
            };
        }
    }
    let Some(id) = raw.id.and_then(|id| id.get().parse::<u64>().ok()) else {
        return UpstreamMessage::Unmatched;
    };
    // Some servers send `"error": null` next to a result: a null error is no error.
    let outcome = match (raw.result, raw.error) {
        (_, Some(err)) if err.get() != "null" => Err(err.into()),
        (Some(result), _) => Ok(result.into()),
        _ => Ok(Json("null")),
    };
    UpstreamMessage::Response { id, outcome }
}

/// An answer as ElectrumX writes it, `{"jsonrpc":"2.0","result":R,"id":N}`,
/// or as Fulcrum does, `{"id":N,"jsonrpc":"2.0","result":R}`: read by
/// position, with `R` checked by [`Json::checked`] (serde_json's check
/// of `R` was the largest single cost of relaying an answer). `None` for
/// anything else (errors, notifications, padding, other member orders),
/// which serde_json reads.
fn fast_response(text: &str) -> Option<UpstreamMessage<'_>> {
    const ELECTRUMX: &str = "{\"jsonrpc\":\"2.0\",\"result\":";
    const FULCRUM: &str = "{\"id\":";
    let (id, result) = if let Some(rest) = text.strip_prefix(ELECTRUMX) {
        let body = rest.strip_suffix('}')?;
        let digits = body.len() - body.bytes().rev().take_while(u8::is_ascii_digit).count();
        let (result, id) = body.split_at(digits);
        (id, result.strip_suffix(",\"id\":")?)
    } else {
        let rest = text.strip_prefix(FULCRUM)?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (id, rest) = rest.split_at(digits);
        let result = rest
            .strip_prefix(",\"jsonrpc\":\"2.0\",\"result\":")?
            .strip_suffix('}')?;
        (id, result)
    };
    // A JSON number: no leading zero (and our ids fit a u64).
    if id.is_empty() || (id.len() > 1 && id.starts_with('0')) {
        return None;
    }
    let id = id.parse::<u64>().ok()?;
    let result = Json::checked(result)?;
    Some(UpstreamMessage::Response {
        id,
        outcome: Ok(result),
    })
}

/// Parse one line received from an upstream. Batches (which the proxy never
/// sends) are split into their members.
pub fn parse_upstream_line(line: &[u8]) -> Result<UpstreamMessages<'_>, LineError> {
    let text = super::utf8(line)?;
    if let Some(msg) = fast_response(text) {
        return Ok(UpstreamMessages::One([msg]));
    }
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let members: Vec<RawUpstream> = serde_json::from_str(text).map_err(|_| LineError::Parse)?;
        Ok(UpstreamMessages::Batch(
            members.into_iter().map(classify_upstream).collect(),
        ))
    } else {
        let msg: RawUpstream = serde_json::from_str(text).map_err(|_| LineError::Parse)?;
        Ok(UpstreamMessages::One([classify_upstream(msg)]))
    }
}

/// The messages of one upstream line: almost always one, which needs no
/// allocation (this is every answer's path); a batch's members in a `Vec`.
#[derive(Debug)]
pub enum UpstreamMessages<'a> {
    One([UpstreamMessage<'a>; 1]),
    Batch(Vec<UpstreamMessage<'a>>),
}

impl<'a> std::ops::Deref for UpstreamMessages<'a> {
    type Target = [UpstreamMessage<'a>];

    fn deref(&self) -> &Self::Target {
        match self {
            UpstreamMessages::One(one) => one,
            UpstreamMessages::Batch(all) => all,
        }
    }
}

impl<'a> IntoIterator for UpstreamMessages<'a> {
    type Item = UpstreamMessage<'a>;
    type IntoIter = UpstreamMessagesIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        match self {
            UpstreamMessages::One(one) => UpstreamMessagesIter::One(one.into_iter()),
            UpstreamMessages::Batch(all) => UpstreamMessagesIter::Batch(all.into_iter()),
        }
    }
}

/// What iterating [`UpstreamMessages`] gives.
pub enum UpstreamMessagesIter<'a> {
    One(std::array::IntoIter<UpstreamMessage<'a>, 1>),
    Batch(std::vec::IntoIter<UpstreamMessage<'a>>),
}

impl<'a> Iterator for UpstreamMessagesIter<'a> {
    type Item = UpstreamMessage<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            UpstreamMessagesIter::One(it) => it.next(),
            UpstreamMessagesIter::Batch(it) => it.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_padded_response() {
        let line = format!(
            r#"{{"jsonrpc":"2.0","result":["ElectrumX 2.0.0","1.4"],"id":7{}}}"#,
            " ".repeat(900)
        );
        let msgs = parse_upstream_line(line.as_bytes()).unwrap();
        match &msgs[0] {
            UpstreamMessage::Response { id, outcome } => {
                assert_eq!(*id, 7);
                assert_eq!(outcome.unwrap().get(), r#"["ElectrumX 2.0.0","1.4"]"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn upstream_error_null_is_success() {
        let msgs = parse_upstream_line(br#"{"result":5,"error":null,"id":3}"#).unwrap();
        assert!(
            matches!(&msgs[0], UpstreamMessage::Response { id: 3, outcome: Ok(r) } if r.get() == "5")
        );
        let msgs = parse_upstream_line(br#"{"error":{"code":1,"message":"x"},"id":4}"#).unwrap();
        assert!(matches!(
            &msgs[0],
            UpstreamMessage::Response {
                id: 4,
                outcome: Err(_)
            }
        ));
    }

    #[test]
    fn upstream_notification_and_batch() {
        let msgs = parse_upstream_line(
            br#"[{"jsonrpc":"2.0","method":"blockchain.relayfee"}, {"result":null,"id":2}]"#,
        )
        .unwrap();
        assert!(
            matches!(&msgs[0], UpstreamMessage::Notification { method, params: None } if method == "blockchain.relayfee")
        );
        assert!(matches!(&msgs[1], UpstreamMessage::Response { id: 2, .. }));
        let msgs = parse_upstream_line(br#"{"error":{"code":-32700},"id":null}"#).unwrap();
        assert!(matches!(msgs[0], UpstreamMessage::Unmatched));
    }
}
