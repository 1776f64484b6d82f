//! A minimal Lambda Runtime API (version 2018-06-01) on 127.0.0.1, enough to drive a function
//! binary the way Lambda does: the function long-polls `GET /runtime/invocation/next`, answers on
//! `POST /runtime/invocation/{id}/response` or `/error`, and reports a failed start-up on
//! `POST /runtime/init/error`.
//!
//! [`RuntimeApi::invoke`] queues one event and awaits the function's answer. The server also
//! records when the function first asked for an event (the end of its init) and, per
//! invocation, when the event was handed out and when the answer came back, for the cold-start
//! benchmark. Used by the integration tests and by `crates/bench`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

const PREFIX: &str = "/2018-06-01/runtime";
/// The deadline announced to the function (`Lambda-Runtime-Deadline-Ms`), from the moment the
/// function picks the event up.
const FUNCTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What the function answered: the body of `/response`, or the body of `/error` (a
/// `{"errorType", "errorMessage"}` diagnostic).
pub type Outcome = Result<Value, Value>;

struct Queued {
    event: Value,
    answer: oneshot::Sender<Outcome>,
}

/// When one invocation's event was handed to the function and when its answer arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvocationTiming {
    pub delivered: Instant,
    pub answered: Instant,
}

impl InvocationTiming {
    pub fn duration(&self) -> Duration {
        self.answered.saturating_duration_since(self.delivered)
    }
}

struct State {
    function_arn: String,
    queue: mpsc::UnboundedSender<Queued>,
    /// Held by the one `/next` long poll that is waiting for an event.
    pending: tokio::sync::Mutex<mpsc::UnboundedReceiver<Queued>>,
    /// Events handed out by `/next` and not answered yet, by request id, with when.
    in_flight: Mutex<HashMap<String, (oneshot::Sender<Outcome>, Instant)>>,
    init_error: Mutex<Option<Value>>,
    next_polls: AtomicUsize,
    /// The number of `/next` polls so far, for waiting on one.
    polls_seen: watch::Sender<usize>,
    first_poll: Mutex<Option<Instant>>,
    timings: Mutex<Vec<InvocationTiming>>,
    ids: AtomicU64,
}

/// The server. It stops (and drops its connections) when this value is dropped.
pub struct RuntimeApi {
    addr: SocketAddr,
    state: Arc<State>,
    server: JoinHandle<()>,
}

impl RuntimeApi {
    pub async fn start(function_name: &str) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (queue, pending) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            function_arn: format!("arn:aws:lambda:us-east-1:123456789012:function:{function_name}"),
            queue,
            pending: tokio::sync::Mutex::new(pending),
            in_flight: Mutex::default(),
            init_error: Mutex::default(),
            next_polls: AtomicUsize::new(0),
            polls_seen: watch::Sender::new(0),
            first_poll: Mutex::default(),
            timings: Mutex::default(),
            ids: AtomicU64::new(1),
        });
        let server = tokio::spawn(serve(listener, state.clone()));
        Self {
            addr,
            state,
            server,
        }
    }

    /// The value of `AWS_LAMBDA_RUNTIME_API`: `127.0.0.1:<port>`.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// Queues `event` for the function's next `/next` and awaits its answer. The returned future
    /// panics if there is no answer within `within`.
    pub fn invoke(&self, event: Value, within: Duration) -> impl Future<Output = Outcome> {
        let (answer, rx) = oneshot::channel();
        self.state
            .queue
            .send(Queued { event, answer })
            .unwrap_or_else(|_| unreachable!("the receiver lives in `self.state`"));
        async move {
            match tokio::time::timeout(within, rx).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_)) => panic!("the Runtime API dropped the invocation unanswered"),
                Err(_) => panic!("the function did not answer within {within:?}"),
            }
        }
    }

    /// The body of `POST /runtime/init/error`, if the function reported one.
    pub fn init_error(&self) -> Option<Value> {
        self.state.init_error.lock().unwrap().clone()
    }

    /// How many times the function has asked for an event (including the poll still waiting).
    pub fn next_polls(&self) -> usize {
        self.state.next_polls.load(Ordering::SeqCst)
    }

    /// When the function first asked for an event: the end of its initialisation.
    pub fn first_poll_at(&self) -> Option<Instant> {
        *self.state.first_poll.lock().unwrap()
    }

    /// Waits until the function has asked for an event `n` times in all; `false` if that did not
    /// happen `within`.
    pub async fn wait_for_polls(&self, n: usize, within: Duration) -> bool {
        let mut polls = self.state.polls_seen.subscribe();
        let seen = tokio::time::timeout(within, polls.wait_for(|seen| *seen >= n)).await;
        matches!(seen, Ok(Ok(_)))
    }

    /// Every answered invocation so far, in the order the answers came.
    pub fn timings(&self) -> Vec<InvocationTiming> {
        self.state.timings.lock().unwrap().clone()
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    // Owned here so that aborting the server task also drops every connection.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| route(state.clone(), req));
            // A function killed in the middle of a long poll just closes its connection.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Reply = Response<Full<Bytes>>;

async fn route(state: Arc<State>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return Ok(reply(StatusCode::NOT_FOUND, json!({"errorMessage": path})));
    };
    let method = req.method().clone();
    Ok(match (method, rest) {
        (Method::GET, "/invocation/next") => next(&state).await,
        (Method::POST, "/init/error") => {
            let body = body_json(req).await;
            *state.init_error.lock().unwrap() = Some(body);
            accepted()
        }
        (Method::POST, rest) => {
            let answer = rest.strip_prefix("/invocation/").and_then(|r| {
                r.strip_suffix("/response")
                    .map(|id| (id, true))
                    .or_else(|| r.strip_suffix("/error").map(|id| (id, false)))
            });
            match answer {
                Some((id, ok)) => {
                    let id = id.to_owned();
                    let body = body_json(req).await;
                    let answered = Instant::now();
                    let Some((waiter, delivered)) = state.in_flight.lock().unwrap().remove(&id)
                    else {
                        return Ok(reply(
                            StatusCode::BAD_REQUEST,
                            json!({"errorType": "InvalidRequestID", "errorMessage": id}),
                        ));
                    };
                    state.timings.lock().unwrap().push(InvocationTiming {
                        delivered,
                        answered,
                    });
                    // The caller may have given up waiting; that is its own failure.
                    let _ = waiter.send(if ok { Ok(body) } else { Err(body) });
                    accepted()
                }
                None => reply(StatusCode::NOT_FOUND, json!({"errorMessage": path})),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, json!({"errorMessage": path})),
    })
}

/// `GET /runtime/invocation/next`: waits until an event is queued.
async fn next(state: &State) -> Reply {
    let polled = Instant::now();
    state.first_poll.lock().unwrap().get_or_insert(polled);
    let polls = state.next_polls.fetch_add(1, Ordering::SeqCst) + 1;
    state.polls_seen.send_replace(polls);
    let queued = {
        let mut pending = state.pending.lock().await;
        pending
            .recv()
            .await
            .expect("the sender lives in the same `State`")
    };
    let n = state.ids.fetch_add(1, Ordering::SeqCst);
    let request_id = format!("8476a536-e9f4-11e8-9739-{n:012x}");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let deadline_ms = (now + FUNCTION_TIMEOUT).as_millis();
    let trace_id = format!(
        "Root=1-{:08x}-{n:024x};Parent={n:016x};Sampled=0;Lineage=1:0a1b2c3d:0",
        now.as_secs()
    );
    state
        .in_flight
        .lock()
        .unwrap()
        .insert(request_id.clone(), (queued.answer, Instant::now()));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("lambda-runtime-aws-request-id", request_id)
        .header("lambda-runtime-deadline-ms", deadline_ms.to_string())
        .header(
            "lambda-runtime-invoked-function-arn",
            state.function_arn.as_str(),
        )
        .header("lambda-runtime-trace-id", trace_id)
        .body(Full::new(Bytes::from(queued.event.to_string())))
        .unwrap()
}

/// A body that is not JSON is kept as a JSON string, so the caller can show it.
async fn body_json(req: Request<Incoming>) -> Value {
    let bytes = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return Value::String(format!("<body not read: {e}>")),
    };
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
}

fn accepted() -> Reply {
    reply(StatusCode::ACCEPTED, json!({"status": "OK"}))
}

fn reply(status: StatusCode, body: Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}
