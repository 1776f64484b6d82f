//! An HTTP proxy in front of moto that answers the way AWS is documented to and moto does not:
//! DynamoDB Streams `GetRecords` returning empty pages in the middle of a shard (AWS docs,
//! "GetRecords": reaching records can take several calls), SQS short polls answering nothing
//! from a queue that holds messages (only a subset of servers is sampled), and one message's
//! `DeleteMessage` failing, and `BatchGetItem` leaving keys unprocessed (as it does when
//! throttled, or past 16 MB of answer). Everything else is passed through unchanged. `pcache` is pointed at
//! it with `--endpoint`, as at any AWS endpoint.
//!
//! The operation is read from `X-Amz-Target` (DynamoDB Streams and SQS both speak AWS JSON).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

/// What the proxy does differently from moto.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Empty pages (`{"Records": [], "NextShardIterator": <the same iterator>}`) answered for
    /// each shard iterator before its call is passed on.
    pub empty_pages: usize,
    /// Whether the iterators `GetShardIterator` hands out get the empty pages too (an empty
    /// first page), or only those of later pages (empty pages in the middle of the range).
    pub empty_first_page: bool,
    /// `Limit` of every `GetRecords` call, so that a range spans several pages.
    pub page_limit: Option<u32>,
    /// `ReceiveMessage` without a wait (short polling) answers no messages.
    pub empty_short_polls: bool,
    /// `DeleteMessage` fails for messages whose body contains this.
    pub fail_delete_of: Option<String>,
    /// `BatchGetItem` leaves the last `.0` keys of its request unprocessed (not passed on,
    /// handed back in `UnprocessedKeys`) in its first `.1` calls.
    pub unprocessed_keys: Option<(usize, usize)>,
}

#[derive(Default)]
struct State {
    /// Calls answered empty so far, per shard iterator.
    empty_answered: HashMap<String, usize>,
    /// Iterators `GetShardIterator` returned.
    first_iterators: HashSet<String>,
    /// Receipt handles of the messages whose delete is to fail.
    poisoned: HashSet<String>,
    counts: Counts,
}

/// What the proxy did, for the tests' assertions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub empty_pages: usize,
    pub empty_short_polls: usize,
    pub failed_deletes: usize,
    /// `BatchGetItem` calls, those asking for strongly consistent reads, and the keys left
    /// unprocessed.
    pub batch_gets: usize,
    pub consistent_batch_gets: usize,
    pub unprocessed_keys: usize,
}

pub struct AwsProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl AwsProxy {
    /// Listens on a free port of 127.0.0.1 and passes calls on to `upstream` (`http://...`).
    pub async fn start(upstream: &str, behaviour: Behaviour) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            behaviour,
            state: state.clone(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(shared.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn counts(&self) -> Counts {
        self.state.lock().unwrap().counts
    }
}

impl Drop for AwsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    upstream: String,
    behaviour: Behaviour,
    state: Arc<Mutex<State>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

fn json_response(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.0")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

impl Shared {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let target = parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let operation = target.rsplit('.').next().unwrap_or_default();
        let mut input: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let b = &self.behaviour;
        let mut body = body;
        // Keys held back from a `BatchGetItem`, by table.
        let mut held_back: Vec<(String, Value)> = Vec::new();
        match operation {
            "BatchGetItem" => {
                let mut state = self.state.lock().unwrap();
                state.counts.batch_gets += 1;
                let tables = input["RequestItems"]
                    .as_object_mut()
                    .cloned()
                    .unwrap_or_default();
                let consistent = tables
                    .values()
                    .any(|t| t["ConsistentRead"].as_bool() == Some(true));
                state.counts.consistent_batch_gets += usize::from(consistent);
                if let Some((keys, calls)) = b.unprocessed_keys {
                    if state.counts.batch_gets <= calls {
                        for (table, mut request) in tables {
                            let all = request["Keys"].as_array().cloned().unwrap_or_default();
                            let kept = all.len().saturating_sub(keys);
                            state.counts.unprocessed_keys += all.len() - kept;
                            let mut back = request.clone();
                            back["Keys"] = json!(all[kept..]);
                            request["Keys"] = json!(all[..kept]);
                            held_back.push((table.clone(), back));
                            if kept == 0 {
                                input["RequestItems"]
                                    .as_object_mut()
                                    .unwrap()
                                    .remove(&table);
                            } else {
                                input["RequestItems"][&table] = request;
                            }
                        }
                        body = Bytes::from(input.to_string());
                    }
                }
                // Every key held back: DynamoDB would answer without reading any.
                if input["RequestItems"]
                    .as_object()
                    .is_some_and(|t| t.is_empty())
                {
                    let unprocessed: serde_json::Map<String, Value> =
                        held_back.into_iter().collect();
                    return json_response(
                        200,
                        json!({"Responses": {}, "UnprocessedKeys": unprocessed}),
                    );
                }
            }
            "GetRecords" => {
                let iterator = input["ShardIterator"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                {
                    let mut state = self.state.lock().unwrap();
                    let first = state.first_iterators.contains(&iterator);
                    if b.empty_first_page || !first {
                        let answered = state.empty_answered.entry(iterator.clone()).or_default();
                        if *answered < b.empty_pages {
                            *answered += 1;
                            state.counts.empty_pages += 1;
                            return json_response(
                                200,
                                json!({"Records": [], "NextShardIterator": iterator}),
                            );
                        }
                    }
                }
                if let Some(limit) = b.page_limit {
                    input["Limit"] = json!(limit);
                    body = Bytes::from(input.to_string());
                }
            }
            "ReceiveMessage"
                if b.empty_short_polls && input["WaitTimeSeconds"].as_i64().unwrap_or(0) == 0 =>
            {
                self.state.lock().unwrap().counts.empty_short_polls += 1;
                return json_response(200, json!({}));
            }
            "DeleteMessage" => {
                let handle = input["ReceiptHandle"].as_str().unwrap_or_default();
                let mut state = self.state.lock().unwrap();
                if state.poisoned.contains(handle) {
                    state.counts.failed_deletes += 1;
                    return json_response(
                        400,
                        json!({
                            "__type": "com.amazonaws.sqs#InvalidAddress",
                            "message": "the proxy refuses this delete"
                        }),
                    );
                }
            }
            _ => {}
        }

        let uri = format!(
            "{}{}",
            self.upstream,
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let mut forward = Request::builder().method(parts.method).uri(uri);
        for (name, value) in &parts.headers {
            if name != "content-length" && name != "host" {
                forward = forward.header(name, value);
            }
        }
        let answer = self
            .client
            .request(forward.body(Full::new(body)).unwrap())
            .await
            .expect("moto answers");
        let (parts, body) = answer.into_parts();
        let mut body = body.collect().await.unwrap().to_bytes();
        let mut output: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !held_back.is_empty() && parts.status.is_success() {
            for (table, keys) in held_back {
                output["UnprocessedKeys"][&table] = keys;
            }
            body = Bytes::from(output.to_string());
        }
        match operation {
            "GetShardIterator" => {
                if let Some(it) = output["ShardIterator"].as_str() {
                    self.state
                        .lock()
                        .unwrap()
                        .first_iterators
                        .insert(it.to_owned());
                }
            }
            "ReceiveMessage" => {
                if let Some(marker) = &b.fail_delete_of {
                    let mut state = self.state.lock().unwrap();
                    for m in output["Messages"].as_array().into_iter().flatten() {
                        if m["Body"].as_str().is_some_and(|body| body.contains(marker)) {
                            let handle = m["ReceiptHandle"].as_str().unwrap_or_default();
                            state.poisoned.insert(handle.to_owned());
                        }
                    }
                }
            }
            _ => {}
        }
        let mut response = Response::builder().status(parts.status);
        for (name, value) in &parts.headers {
            if name != "content-length" && name != "transfer-encoding" {
                response = response.header(name, value);
            }
        }
        response.body(Full::new(body)).unwrap()
    }
}
