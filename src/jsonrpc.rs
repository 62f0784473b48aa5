//! The JSON-RPC 2.0 wire format, as Electrum peers speak it.
//!
//! Owns: classifying one line (request, batch, response, notification: the
//! upstream side is `upstream`), reading `id` and `method` without building
//! a tree of params or results (they stay borrowed slices, [`Json`], checked
//! by `valid`), and writing replies. Every JSON-RPC error code
//! the proxy emits is chosen in [`ErrorCode`].
//!
//! Tolerances the wild needs: a missing `jsonrpc` member is a 2.0 request
//! (Coinomi-based wallets omit it); a missing or `null` `params` is `[]`;
//! whitespace anywhere (ElectrumX 2.0 pads its replies with spaces).

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt::Write as _;

/// The error codes the proxy itself produces. Upstream error objects are
/// relayed untouched and never pass through here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    InternalError,
    /// ElectrumX's BAD_REQUEST (1): a well-formed request the server refuses.
    BadRequest,
    /// ElectrumX's DAEMON_ERROR (2).
    DaemonError,
    /// No healthy upstream could take the request, or it failed there.
    UpstreamUnavailable,
    /// The upstream did not answer within the request timeout.
    UpstreamTimeout,
    /// A per-session or per-coin limit was hit.
    LimitExceeded,
}

impl ErrorCode {
    pub fn code(self) -> i64 {
        match self {
            ErrorCode::ParseError => -32700,
            ErrorCode::InvalidRequest => -32600,
            ErrorCode::MethodNotFound => -32601,
            ErrorCode::InvalidParams => -32602,
            ErrorCode::InternalError => -32603,
            ErrorCode::BadRequest => 1,
            ErrorCode::DaemonError => 2,
            // Implementation-defined server errors live in -32000..-32099.
            ErrorCode::UpstreamUnavailable => -32001,
            ErrorCode::UpstreamTimeout => -32002,
            ErrorCode::LimitExceeded => -32003,
        }
    }
}

/// An error the proxy answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: ErrorCode,
    pub message: String,
}

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code.code())
    }
}

/// One request as a client sent it, borrowing from the line.
#[derive(Debug)]
pub struct Request<'a> {
    /// `None` when the member is absent: a client notification, never answered.
    /// A present `null` is an id like any other.
    pub id: Option<Json<'a>>,
    pub method: Cow<'a, str>,
    /// `None` when absent or `null`; callers treat that as `[]`.
    pub params: Option<Json<'a>>,
}

impl Request<'_> {
    /// The params as raw JSON text, `[]` when absent.
    pub fn params_str(&self) -> &str {
        self.params.map_or("[]", |p| p.get())
    }
}

/// What a client line turned out to be.
#[derive(Debug)]
pub enum ClientMessage<'a> {
    Single(Result<Request<'a>, Invalid<'a>>),
    /// Each member classified on its own: a bad member does not spoil the rest.
    Batch(Vec<Result<Request<'a>, Invalid<'a>>>),
}

/// A line, or batch member, that is JSON but not a request.
#[derive(Debug)]
pub struct Invalid<'a> {
    /// The id, when one could be read, so the error can be matched.
    pub id: Option<Json<'a>>,
    pub error: RpcError,
}

/// Why a whole line could not be used at all.
#[derive(Debug, PartialEq, Eq)]
pub enum LineError {
    /// Not JSON (answered with -32700 and id null).
    Parse,
    /// JSON, but neither an object nor a non-empty array (-32600, id null).
    NotRequest(&'static str),
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    method: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    params: Option<&'a RawValue>,
}

/// Keep a member that is present even when its value is `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn first_byte(text: &str) -> u8 {
    text.bytes().next().unwrap_or(b' ')
}

/// The members of a request object that matter, as found.
#[derive(Default)]
struct Fields<'a> {
    id: Option<Json<'a>>,
    method: Option<Json<'a>>,
    params: Option<Json<'a>>,
}

impl<'a> From<RawRequest<'a>> for Fields<'a> {
    fn from(req: RawRequest<'a>) -> Fields<'a> {
        Fields {
            id: req.id.map(Json::from),
            method: req.method.map(Json::from),
            params: req.params.map(Json::from),
        }
    }
}

/// A request object read member by member with [`valid::each_member`]
/// (any member order, any whitespace; other members are skipped, as
/// serde_json skips them), without serde_json's pass over it. `None` for
/// anything it does not read (a key with an escape, a member twice, text
/// that is not exactly one object), which serde_json then reads.
fn fast_fields(text: &str) -> Option<Fields<'_>> {
    let mut fields = Fields::default();
    let complete = valid::each_member(text, |key, value| {
        let slot = match key {
            "id" => &mut fields.id,
            "method" => &mut fields.method,
            "params" => &mut fields.params,
            _ => return true,
        };
        // A member twice: serde_json refuses the object.
        slot.replace(Json(value)).is_none()
    });
    complete.then_some(fields)
}

fn classify_request(raw: &RawValue) -> Result<Request<'_>, Invalid<'_>> {
    let invalid = |id, msg: &str| Invalid {
        id,
        error: RpcError::new(ErrorCode::InvalidRequest, msg),
    };
    if first_byte(raw.get()) != b'{' {
        return Err(invalid(None, "request must be a JSON object"));
    }
    if let Some(fields) = fast_fields(raw.get()) {
        return classify_fields(fields);
    }
    let req: RawRequest = match serde_json::from_str(raw.get()) {
        Ok(r) => r,
        Err(_) => return Err(invalid(None, "malformed request object")),
    };
    classify_fields(req.into())
}

/// Check the members of a request object.
fn classify_fields(req: Fields<'_>) -> Result<Request<'_>, Invalid<'_>> {
    let invalid = |id, msg: &str| Invalid {
        id,
        error: RpcError::new(ErrorCode::InvalidRequest, msg),
    };
    let id = match req.id {
        Some(id) if matches!(first_byte(id.get()), b'{' | b'[' | b't' | b'f') => {
            return Err(invalid(None, "id must be a string, a number or null"));
        }
        other => other,
    };
    // A `null` method is a missing one (as serde_json reads an `Option`).
    let method = match req.method.filter(|m| m.get() != "null") {
        Some(m) if first_byte(m.get()) == b'"' => match m.get() {
            // A checked string without escapes is its own text.
            text if valid::needs_no_escape(&text[1..text.len() - 1]) => {
                Cow::Borrowed(&text[1..text.len() - 1])
            }
            text => match serde_json::from_str::<Cow<str>>(text) {
                Ok(s) => s,
                Err(_) => return Err(invalid(id, "method must be a string")),
            },
        },
        Some(_) => return Err(invalid(id, "method must be a string")),
        None => return Err(invalid(id, "missing method")),
    };
    let params = match req.params {
        Some(p) if p.get() == "null" => None,
        Some(p) if matches!(first_byte(p.get()), b'[' | b'{') => Some(p),
        Some(_) => {
            return Err(Invalid {
                id,
                error: RpcError::new(
                    ErrorCode::InvalidParams,
                    "params must be an array or object",
                ),
            })
        }
        None => None,
    };
    Ok(Request { id, method, params })
}

/// A line as text, or [`LineError::Parse`] when it is not UTF-8. Checked
/// with SIMD (simdutf8: AVX2 or SSE4.2, chosen at run time; std's check
/// for lines under 64 bytes): std's check went through every line of both
/// directions a word at a time, about 430 of the proxy's instructions per
/// uncached answer.
pub(crate) fn utf8(line: &[u8]) -> Result<&str, LineError> {
    simdutf8::basic::from_utf8(line).map_err(|_| LineError::Parse)
}

/// Classify one line received from a client.
pub fn parse_client_line(line: &[u8]) -> Result<ClientMessage<'_>, LineError> {
    let text = utf8(line)?;
    // The common case, one well-formed request object, in one pass; the
    // rest (and every error) is classified below.
    if let Some(fields) = fast_fields(text) {
        return Ok(ClientMessage::Single(classify_fields(fields)));
    }
    if text.trim_start().starts_with('{') {
        if let Ok(req) = serde_json::from_str::<RawRequest>(text) {
            return Ok(ClientMessage::Single(classify_fields(req.into())));
        }
    }
    let raw: &RawValue = serde_json::from_str(text).map_err(|_| LineError::Parse)?;
    match first_byte(raw.get()) {
        b'{' => Ok(ClientMessage::Single(classify_request(raw))),
        b'[' => {
            let members: Vec<&RawValue> =
                serde_json::from_str(raw.get()).map_err(|_| LineError::Parse)?;
            if members.is_empty() {
                return Err(LineError::NotRequest("empty batch"));
            }
            Ok(ClientMessage::Batch(
                members.into_iter().map(classify_request).collect(),
            ))
        }
        _ => Err(LineError::NotRequest(
            "a request must be an object or a batch array",
        )),
    }
}

mod upstream;
mod valid;

pub use upstream::{parse_upstream_line, UpstreamMessage, UpstreamMessages, UpstreamMessagesIter};

/// JSON text known to be one valid value: an upstream's result or error
/// object, borrowed from the line it arrived on, relayed verbatim. Made
/// only by checking (see [`valid`]) or from a `RawValue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Json<'a>(&'a str);

impl<'a> Json<'a> {
    pub fn get(&self) -> &'a str {
        self.0
    }

    /// `text`, if it is one JSON value with no whitespace around it (see
    /// [`valid::is_one_value`]: `None` may also mean "unusual; ask serde_json").
    pub fn checked(text: &'a str) -> Option<Json<'a>> {
        valid::is_one_value(text).then_some(Json(text))
    }
}

impl<'a> From<&'a RawValue> for Json<'a> {
    fn from(raw: &'a RawValue) -> Json<'a> {
        Json(raw.get())
    }
}

/// A finished reply line (without the trailing newline).
pub type Line = Vec<u8>;

/// `{"jsonrpc":"2.0","result":R,"id":ID}`
pub fn result_line(id: &str, result: &str) -> Line {
    let mut out = Vec::with_capacity(40 + id.len() + result.len());
    push_result(&mut out, id.as_bytes(), result);
    out
}

/// [`result_line`], appended to `out` (the id as its JSON text's bytes).
pub fn push_result(out: &mut Vec<u8>, id: &[u8], result: &str) {
    out.reserve(40 + id.len() + result.len());
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"result\":");
    out.extend_from_slice(result.as_bytes());
    out.extend_from_slice(b",\"id\":");
    out.extend_from_slice(id);
    out.push(b'}');
}

/// `{"jsonrpc":"2.0","error":E,"id":ID}` with an error object relayed verbatim.
pub fn error_object_line(id: &str, error: &str) -> Line {
    let mut out = Vec::with_capacity(40 + id.len() + error.len());
    push_error_object(&mut out, id.as_bytes(), error);
    out
}

/// [`error_object_line`], appended to `out` (the id as its JSON text's
/// bytes).
pub fn push_error_object(out: &mut Vec<u8>, id: &[u8], error: &str) {
    out.reserve(40 + id.len() + error.len());
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"error\":");
    out.extend_from_slice(error.as_bytes());
    out.extend_from_slice(b",\"id\":");
    out.extend_from_slice(id);
    out.push(b'}');
}

/// The JSON text of one of the proxy's own error objects.
pub fn error_object(err: &RpcError) -> String {
    let mut s = String::with_capacity(48 + err.message.len());
    let _ = write!(
        s,
        "{{\"code\":{},\"message\":{}}}",
        err.code.code(),
        serde_json::to_string(&err.message).unwrap_or_else(|_| "\"\"".into())
    );
    s
}

/// An error reply from the proxy itself.
pub fn error_line(id: &str, err: &RpcError) -> Line {
    error_object_line(id, &error_object(err))
}

/// `{"jsonrpc":"2.0","method":M,"params":P}`
pub fn notification_line(method: &str, params: &str) -> Line {
    let mut out = Vec::with_capacity(48 + method.len() + params.len());
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":");
    out.extend_from_slice(quote(method).as_bytes());
    out.extend_from_slice(b",\"params\":");
    out.extend_from_slice(params.as_bytes());
    out.push(b'}');
    out
}

/// A request without its id, ready for an upstream connection to append
/// `<id>}` (see [`finish_request`]). Built once per forwarded request; the
/// same bytes serve retries and coalescing keys.
pub fn request_prefix(method: &str, params: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + method.len() + params.len());
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":");
    if valid::needs_no_escape(method) {
        // Method names need no escaping: no JSON string built for them.
        out.push(b'"');
        out.extend_from_slice(method.as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(quote(method).as_bytes());
    }
    out.extend_from_slice(b",\"params\":");
    out.extend_from_slice(params.as_bytes());
    out.extend_from_slice(b",\"id\":");
    out
}

/// Append a request prefix with its upstream id and the line end to `buf`.
pub fn finish_request(buf: &mut Vec<u8>, prefix: &[u8], id: u64) {
    buf.extend_from_slice(prefix);
    buf.extend_from_slice(decimal(id, &mut [0; 20]));
    buf.extend_from_slice(b"}\n");
}

/// `n` in decimal ASCII digits, written into `buf` (on hot paths, where
/// `format!` would allocate; bytes, which need no UTF-8 check).
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

/// JSON string literal for `s`.
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Join finished lines into one batch reply line.
pub fn batch_line(members: impl IntoIterator<Item = Line>) -> Line {
    let mut out = vec![b'['];
    for (i, m) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&m);
    }
    out.push(b']');
    out
}

/// The text of the `null` id, for errors about lines whose id is unknown.
pub const NULL_ID: &str = "null";

#[cfg(test)]
mod tests {
    use super::*;

    fn single(line: &str) -> Result<Request<'_>, Invalid<'_>> {
        match parse_client_line(line.as_bytes()).unwrap() {
            ClientMessage::Single(r) => r,
            ClientMessage::Batch(_) => panic!("not a batch"),
        }
    }

    #[test]
    fn request_with_all_members() {
        let r = single(r#"{"jsonrpc":"2.0","id":"a b","method":"server.ping","params":[1, 2]}"#)
            .unwrap();
        assert_eq!(r.id.unwrap().get(), "\"a b\"");
        assert_eq!(r.method, "server.ping");
        assert_eq!(r.params_str(), "[1, 2]");
    }

    #[test]
    fn legacy_request_without_jsonrpc_or_params() {
        let r = single(r#"{"id": 0, "method": "blockchain.headers.subscribe"}"#).unwrap();
        assert_eq!(r.id.unwrap().get(), "0");
        assert_eq!(r.params_str(), "[]");
        let r = single(r#"{"id":1,"method":"x","params":null}"#).unwrap();
        assert_eq!(r.params_str(), "[]");
    }

    #[test]
    fn missing_id_is_notification_but_null_id_is_kept() {
        assert!(single(r#"{"method":"server.ping"}"#).unwrap().id.is_none());
        assert_eq!(
            single(r#"{"id":null,"method":"server.ping"}"#)
                .unwrap()
                .id
                .unwrap()
                .get(),
            "null"
        );
    }

    #[test]
    fn escaped_method_is_decoded() {
        let r = single(r#"{"id":1,"method":"server.p\u0069ng"}"#).unwrap();
        assert_eq!(r.method, "server.ping");
    }

    #[test]
    fn invalid_requests() {
        let e = single(r#"{"id":1}"#).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::InvalidRequest);
        assert_eq!(e.id.unwrap().get(), "1");
        assert_eq!(
            single(r#"{"id":1,"method":5}"#).unwrap_err().error.code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            single(r#"{"id":{},"method":"a"}"#).unwrap_err().error.code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            single(r#"{"id":1,"method":"a","params":"x"}"#)
                .unwrap_err()
                .error
                .code,
            ErrorCode::InvalidParams
        );
    }

    #[test]
    fn line_errors() {
        assert_eq!(
            parse_client_line(b"not json").unwrap_err(),
            LineError::Parse
        );
        assert_eq!(
            parse_client_line(b"{\"id\":1,").unwrap_err(),
            LineError::Parse
        );
        assert_eq!(
            parse_client_line(b"\xff\xfe").unwrap_err(),
            LineError::Parse
        );
        assert!(matches!(
            parse_client_line(b"5").unwrap_err(),
            LineError::NotRequest(_)
        ));
        assert!(matches!(
            parse_client_line(b"[]").unwrap_err(),
            LineError::NotRequest(_)
        ));
    }

    #[test]
    fn batch_members_are_classified_separately() {
        let msg =
            parse_client_line(br#"[{"id":1,"method":"a"}, 7, {"id":2,"method":"b"}]"#).unwrap();
        let ClientMessage::Batch(members) = msg else {
            panic!()
        };
        assert_eq!(members.len(), 3);
        assert!(members[0].is_ok());
        assert!(members[1].is_err());
        assert_eq!(members[2].as_ref().unwrap().method, "b");
    }

    #[test]
    fn decimal_writes_every_u64() {
        for n in [0, 7, 10, 1234567890, u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }

    #[test]
    fn reply_lines() {
        assert_eq!(
            result_line("\"x\"", "[1]"),
            br#"{"jsonrpc":"2.0","result":[1],"id":"x"}"#
        );
        let err = RpcError::new(ErrorCode::ParseError, "invalid \"JSON\"");
        assert_eq!(
            String::from_utf8(error_line(NULL_ID, &err)).unwrap(),
            r#"{"jsonrpc":"2.0","error":{"code":-32700,"message":"invalid \"JSON\""},"id":null}"#
        );
        let mut buf = Vec::new();
        finish_request(&mut buf, &request_prefix("server.ping", "[]"), 1234);
        assert_eq!(
            buf,
            b"{\"jsonrpc\":\"2.0\",\"method\":\"server.ping\",\"params\":[],\"id\":1234}\n"
        );
        assert_eq!(batch_line(vec![b"1".to_vec(), b"2".to_vec()]), b"[1,2]");
        let mut buf = Vec::new();
        finish_request(&mut buf, b"", 0);
        finish_request(&mut buf, b"", u64::MAX);
        assert_eq!(buf, b"0}\n18446744073709551615}\n");
        // A method name that needs escaping is escaped.
        assert_eq!(
            request_prefix("a\"b", "[]"),
            b"{\"jsonrpc\":\"2.0\",\"method\":\"a\\\"b\",\"params\":[],\"id\":"
        );
    }
}
