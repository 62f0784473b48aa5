//! A real browser (issue 17): headless Chromium (Debian's `chromium`)
//! loads `tests/browser/wallet.html` from a small HTTP server of this test,
//! the page connects to electrum-lb over `wss://` (the development
//! certificate, accepted with `--ignore-certificate-errors`) on a listener
//! that only accepts the page's own `Origin`, negotiates, sends a batch,
//! subscribes to headers and to a scripthash, and shows what it got. The
//! test changes the scripthash's history and mines a block; the page shows
//! both notifications and calls `/done`, which releases the script that
//! kept the page loading, so `--dump-dom` prints the page with its results.
//! The test reads them from the DOM.
//!
//! Skipped when Chromium is not installed; `.ci/run` installs it and
//! requires it.
mod support;

use bytes::Bytes;
use electrum_lb::config::Scheme;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::process::Stdio;
use std::time::Duration;
use support::mock::{status_of, Mock};
use support::*;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Chromium's start on a busy two-core machine can take a while.
const BROWSER_WAIT: Duration = Duration::from_secs(90);

const PAGE: &str = include_str!("browser/wallet.html");

/// Serve the page, `/hold.js` (answered once the page has called
/// `/done`) and `/done` (what the page reports, kept in `done`).
async fn serve_page(listener: TcpListener, done: watch::Sender<Option<String>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let done = done.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let done = done.clone();
                    async move {
                        let path = request.uri().path().to_string();
                        let (status, kind, body) = match path.as_str() {
                            "/wallet.html" => {
                                (StatusCode::OK, "text/html; charset=utf-8", PAGE.to_string())
                            }
                            "/hold.js" => {
                                let mut seen = done.subscribe();
                                let _ = seen.wait_for(Option::is_some).await;
                                (
                                    StatusCode::OK,
                                    "text/javascript",
                                    "// released\n".to_string(),
                                )
                            }
                            "/done" => {
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                done.send_replace(Some(
                                    String::from_utf8_lossy(&body).into_owned(),
                                ));
                                (StatusCode::OK, "text/plain", "ok\n".to_string())
                            }
                            _ => (
                                StatusCode::NOT_FOUND,
                                "text/plain",
                                "not found\n".to_string(),
                            ),
                        };
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = status;
                        response
                            .headers_mut()
                            .insert(hyper::header::CONTENT_TYPE, kind.parse().unwrap());
                        Ok::<_, Infallible>(response)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The text of the element `<tag id="id">` in a DOM dump.
fn element_text(dom: &str, tag: &str, id: &str) -> Option<String> {
    let open = format!("<{tag} id=\"{id}\">");
    let start = dom.find(&open)? + open.len();
    let end = start + dom[start..].find(&format!("</{tag}>"))?;
    Some(
        dom[start..end]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&amp;", "&"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_wallet_over_wss() {
    let Some(chromium) = require_tool("chromium") else {
        return;
    };
    let mock = Mock::start().await;
    let sh = scripthash(1);
    let h0 = vec![(txid(1), 50)];
    mock.set_history_silently(&sh, h0.clone());

    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", http.local_addr().unwrap());
    let text = format!(
        "{}\n[coins.test]\nlisten = [{{ url = \"wss://127.0.0.1:0\", path = \"/electrum\", origins = [\"{origin}\"] }}]\nupstreams = [\"{}\"]\n",
        config_head(),
        mock.url()
    );
    let server = start_proxy(&text).await;
    wait_ready(&server, "test").await;
    let wss = server.addr("test", Scheme::Wss).unwrap();
    let (done, mut reported) = watch::channel(None);
    let page_server = tokio::spawn(serve_page(http, done));

    let profile = temp_dir("chromium-profile");
    let page = format!(
        "{origin}/wallet.html?url=wss://127.0.0.1:{}/electrum&scripthash={sh}",
        wss.port()
    );
    let browser = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // The proxy serves the self-signed development certificate.
            "--ignore-certificate-errors",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", &page])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");

    // Once the page holds its subscription upstream, the scripthash is
    // paid and a block is found.
    let subscribed = tokio::time::timeout(BROWSER_WAIT, async {
        tokio::select! {
            _ = async {
                while mock.subscriptions() == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } => true,
            // The page gave up before subscribing: its DOM says why.
            _ = reported.wait_for(Option::is_some) => false,
        }
    })
    .await
    .expect("the page neither subscribed nor reported");
    let h1 = vec![(txid(1), 50), (txid(2), 0)];
    if subscribed {
        mock.set_history(&sh, h1.clone());
        mock.mine(1);
    }
    let output = tokio::time::timeout(BROWSER_WAIT, browser.wait_with_output())
        .await
        .expect("chromium did not finish")
        .unwrap();
    let dom = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let state = element_text(&dom, "span", "state");
    assert_eq!(
        state.as_deref(),
        Some("done"),
        "the page did not finish.\nDOM:\n{dom}\nchromium's stderr:\n{stderr}"
    );
    let got: Value = serde_json::from_str(&element_text(&dom, "pre", "result").unwrap())
        .unwrap_or_else(|e| panic!("{e}: {dom}"));

    // What the browser was answered and notified, as the page shows it.
    assert_eq!(got["version"][1], "1.4", "{got}");
    assert!(
        got["version"][0]
            .as_str()
            .unwrap()
            .starts_with("electrum-lb"),
        "{got}"
    );
    assert_eq!(got["tip"]["height"], 99, "{got}");
    assert_eq!(got["tip"]["hex"], json!(mock.header_hex(99)), "{got}");
    assert_eq!(got["status"], json!(status_of(&h0)), "{got}");
    assert_eq!(
        got["batch"],
        json!([
            {"jsonrpc": "2.0", "result": null, "id": "ping"},
            {"jsonrpc": "2.0", "result": mock.header_hex(1), "id": "header"}
        ]),
        "{got}"
    );
    let notifications = got["notifications"].as_array().unwrap();
    assert!(
        notifications.contains(&json!({
            "method": "blockchain.scripthash.subscribe",
            "params": [sh, status_of(&h1)]
        })),
        "{got}"
    );
    let header = notifications
        .iter()
        .find(|n| n["method"] == "blockchain.headers.subscribe")
        .unwrap_or_else(|| panic!("no header notification: {got}"));
    assert_eq!(header["params"][0]["height"], 100, "{got}");
    assert_eq!(header["params"][0]["hex"], json!(mock.tip().1), "{got}");
    assert_eq!(
        sample(
            &server.metrics.render(),
            "electrum_lb_sessions_total{coin=\"test\",transport=\"wss\"}"
        ),
        Some(1.0)
    );
    page_server.abort();
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(profile);
}
