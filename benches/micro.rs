//! Micro-benchmarks of the per-message work on the hot path:
//!
//! - framing: `codec::LineReader` splitting a buffer of request lines;
//! - id rewriting: a client request read and turned into an upstream
//!   request (`parse_client_line`, `request_prefix`, `finish_request`), and
//!   an upstream answer read and given back its client id
//!   (`parse_upstream_line`, `result_line`);
//! - the cache: the policy of a request, a hit answered into a session
//!   queue, a request the cache does not keep passing through, and an
//!   uncached scripthash read from the cache to its answer in the session
//!   queue (key, flight, hook, landing: what every uncached read costs);
//! - coalescing: a flight nobody joins, started and landed (most flights);
//! - the session queue (`reply::queue`): four answers queued and taken by
//!   the writer in one go, as a burst from one upstream read is.
//!
//! ```text
//! cargo bench --bench micro
//! cargo bench --bench micro -- cache   # one group
//! ```

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use electrum_lb::cache::{self, Cache};
use electrum_lb::coalesce::Coalescer;
use electrum_lb::codec::{Frame, LineReader};
use electrum_lb::config::CacheConfig;
use electrum_lb::jsonrpc::{self, ClientMessage, UpstreamMessage};
use electrum_lb::reply::{self, Answer, Responder};
use serde_json::value::RawValue;
use std::hint::black_box;
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SCRIPTHASH: &str = "8b01df4e368ea28f8dc0423bcf7a4923e3a12d307c875e47a0cfbf90b5c39161";
const TXID: &str = "f3e1bf48975b8d6060a9de8884296abb80be618dc00ae3cb2f6cee3085e09403";

fn history_request(id: u64) -> String {
    format!(
        "{{\"jsonrpc\":\"2.0\",\"method\":\"blockchain.scripthash.get_history\",\"params\":[\"{SCRIPTHASH}\"],\"id\":{id}}}"
    )
}

/// A three-item history answer, as an upstream sends it.
fn history_answer(id: u64) -> String {
    let item = |h: u32| format!("{{\"tx_hash\":\"{TXID}\",\"height\":{h}}}");
    format!(
        "{{\"jsonrpc\":\"2.0\",\"result\":[{},{},{}],\"id\":{id}}}",
        item(100),
        item(200),
        item(300)
    )
}

fn framing(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut input = Vec::new();
    for i in 0..1000 {
        input.extend_from_slice(history_request(i).as_bytes());
        input.push(b'\n');
    }
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(input.len() as u64));
    g.bench_function("line_reader_1000_requests", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut reader = LineReader::new(&input[..], 1024 * 1024);
                let mut n = 0;
                while let Frame::Line(line) = reader.next_frame().await.expect("frame") {
                    n += line.len();
                }
                black_box(n)
            })
        })
    });
    g.finish();
}

fn id_rewriting(c: &mut Criterion) {
    let request = history_request(7);
    let answer = history_answer(1234);
    let mut g = c.benchmark_group("id_rewriting");
    g.throughput(Throughput::Elements(1));
    g.bench_function("client_request_to_upstream", |b| {
        let mut buf = Vec::with_capacity(512);
        b.iter(|| {
            buf.clear();
            let Ok(ClientMessage::Single(Ok(req))) =
                jsonrpc::parse_client_line(black_box(request.as_bytes()))
            else {
                panic!("a request");
            };
            let prefix = jsonrpc::request_prefix(&req.method, req.params_str());
            jsonrpc::finish_request(&mut buf, &prefix, 1234);
            black_box(&buf);
        })
    });
    g.bench_function("upstream_answer_to_client", |b| {
        let client_id = "\"wallet-7\"";
        b.iter(|| {
            let msgs = jsonrpc::parse_upstream_line(black_box(answer.as_bytes())).expect("JSON");
            for m in msgs {
                if let UpstreamMessage::Response {
                    id,
                    outcome: Ok(result),
                } = m
                {
                    black_box(id);
                    black_box(jsonrpc::result_line(client_id, result.get()));
                }
            }
        })
    });
    g.finish();
}

fn cache(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cache = Arc::new(Cache::new(&CacheConfig::default()));
    cache.on_tip(1000, "00");
    let raw_tx = format!("\"{}\"", "ab".repeat(250));
    let tx_params = format!("[\"{TXID}\"]");
    // Fill the cache through its own path: one miss, answered at once.
    rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let answer = RawValue::from_string(raw_tx.clone()).expect("JSON");
        cache.serve(
            "blockchain.transaction.get",
            &tx_params,
            Responder::Internal(tx),
            |r| r.deliver(Ok((&*answer).into())),
        );
        assert!(matches!(rx.await, Ok(Ok(Answer::Result(_)))));
        while cache.is_empty() {
            tokio::task::yield_now().await;
        }
    });
    let (out, mut lines) = reply::channel(1024, CancellationToken::new(), None, None);
    let id = RawValue::from_string("42".into()).expect("JSON");
    let history_params = format!("[\"{SCRIPTHASH}\"]");

    let mut g = c.benchmark_group("cache");
    g.throughput(Throughput::Elements(1));
    g.bench_function("policy_transaction_get", |b| {
        b.iter(|| cache::policy("blockchain.transaction.get", black_box(&tx_params)))
    });
    g.bench_function("policy_get_history", |b| {
        b.iter(|| {
            cache::policy(
                "blockchain.scripthash.get_history",
                black_box(&history_params),
            )
        })
    });
    g.bench_function("hit_into_session_queue", |b| {
        b.iter_batched(
            || Responder::client(id.get(), &out, "blockchain.transaction.get", Instant::now()),
            |responder| {
                cache.serve("blockchain.transaction.get", &tx_params, responder, |_| {
                    panic!("a hit sends nothing")
                });
                black_box(an_answer(lines.try_recv_all()));
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("pass_through_uncached", |b| {
        b.iter_batched(
            || history_responder(&id, &out),
            |responder| {
                cache.serve(
                    "blockchain.scripthash.get_history",
                    &history_params,
                    responder,
                    |r| {
                        black_box(&r);
                    },
                );
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("uncached_miss_landed", |b| {
        let answer = history_answer(0);
        let result =
            &answer[answer.find('[').expect("a result")..answer.rfind(']').expect("]") + 1];
        let result = RawValue::from_string(result.to_string()).expect("JSON");
        b.iter_batched(
            || history_responder(&id, &out),
            |responder| {
                cache.serve(
                    "blockchain.scripthash.get_history",
                    &history_params,
                    responder,
                    |r| r.deliver(Ok((&*result).into())),
                );
                black_box(an_answer(lines.try_recv_all()));
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// What the writer took: one answer, and its bytes.
fn an_answer(taken: reply::Taken) -> Vec<u8> {
    assert_eq!(taken.lines, 1, "an answer");
    taken.bytes
}

/// A client's responder for a history read, as a session makes one.
fn history_responder(id: &RawValue, out: &reply::Outbound) -> Responder {
    Responder::client(
        id.get(),
        out,
        "blockchain.scripthash.get_history",
        Instant::now(),
    )
}

fn coalesce(c: &mut Criterion) {
    let flights = Coalescer::default();
    let (out, mut lines) = reply::channel(1024, CancellationToken::new(), None, None);
    let id = RawValue::from_string("42".into()).expect("JSON");
    let key = format!("blockchain.scripthash.get_history[\"{SCRIPTHASH}\"]#0");
    let result = RawValue::from_string("[]".into()).expect("JSON");
    let mut g = c.benchmark_group("coalesce");
    g.throughput(Throughput::Elements(1));
    g.bench_function("join_and_land_alone", |b| {
        b.iter_batched(
            || history_responder(&id, &out),
            |responder| {
                let flight = flights.join(black_box(&key), responder).expect("alone");
                flight.land_borrowed(Ok(Ok((&*result).into())));
                black_box(an_answer(lines.try_recv_all()));
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn queue(c: &mut Criterion) {
    let (out, mut inbox) = reply::channel(1024, CancellationToken::new(), None, None);
    let answer = history_answer(7);
    let result = &answer[answer.find('[').expect("a result")..answer.rfind(']').expect("]") + 1];
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(4));
    g.bench_function("four_answers_queued_and_taken", |b| {
        b.iter(|| {
            for id in ["1", "2", "3", "4"] {
                out.send_with(|buf| jsonrpc::push_result(buf, id.as_bytes(), black_box(result)));
            }
            black_box(inbox.try_recv_all())
        })
    });
    g.finish();
}

/// The check every upstream result passes before a client sees it: the
/// proxy's own (`jsonrpc/valid.rs`) against serde_json's, on a history.
fn json_check(c: &mut Criterion) {
    let answer = history_answer(7);
    let result = &answer[answer.find('[').expect("a result")..answer.rfind(']').expect("]") + 1];
    let mut g = c.benchmark_group("json_check");
    g.throughput(Throughput::Bytes(result.len() as u64));
    g.bench_function("history_result", |b| {
        b.iter(|| black_box(jsonrpc::Json::checked(black_box(result))).expect("valid"))
    });
    g.bench_function("history_result_serde_json", |b| {
        b.iter(|| black_box(serde_json::from_str::<&RawValue>(black_box(result))).expect("valid"))
    });
    g.finish();
}

criterion_group!(
    benches,
    framing,
    id_rewriting,
    cache,
    coalesce,
    queue,
    json_check
);
criterion_main!(benches);
