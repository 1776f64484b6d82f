//! A minimal Lambda Runtime API (version 2018-06-01) and Extensions API (2020-01-01) on
//! 127.0.0.1, enough to drive a function binary the way Lambda does: the function long-polls
//! `GET /runtime/invocation/next`, answers on `POST /runtime/invocation/{id}/response` or
//! `/error`, and reports a failed start-up on `POST /runtime/init/error`; an extension registers
//! on `POST /extension/register` and long-polls `GET /extension/event/next` for `INVOKE` events.
//!
//! Lambda's lifecycle, as far as a function can tell: an invocation's answer goes to the caller
//! as soon as the runtime posts it, but the next event is handed out only once the runtime and
//! every registered extension have asked for their next one (the invocation is then settled).
//! Registration closes with the first event. With [`RuntimeApi::freeze`] given the function's
//! pid, the process is also frozen (SIGSTOP) whenever the invocation is settled and no event is
//! waiting, and thawed (SIGCONT) when the next event is handed out, as Lambda freezes an
//! execution environment between invocations.
//!
//! [`RuntimeApi::fail_extension_next`] breaks the extensions' `next`, for the tests of what a
//! function does when its extension's loop ends.
//!
//! [`RuntimeApi::invoke`] queues one event and awaits the function's answer. The server records
//! what happened in order ([`RuntimeApi::events`]): each event handed out, each answer, each
//! `next` of the runtime and of every extension, each settlement, freeze and thaw; and when the
//! function first asked for an event (the end of its init) and, per invocation, when the event
//! was handed out, answered and settled, for the cold-start benchmark. Used by the integration
//! tests and by `crates/bench`.
//!
//! - this file: [`RuntimeApi`], what it records, and the state its tasks share.
//! - `dispatch.rs`: handing events out, settling, freezing and thawing.
//! - `server.rs`: the HTTP server and its routes.
//! - `runtime.rs`: the Runtime API's invocation routes.
//! - `extensions.rs`: the Extensions API.
//! - `reply.rs`: JSON replies and bodies.

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

mod dispatch;
mod extensions;
mod reply;
mod runtime;
mod server;

use dispatch::{dispatch, signal};
use server::serve;

/// What the function answered: the body of `/response`, or the body of `/error` (a
/// `{"errorType", "errorMessage"}` diagnostic).
pub type Outcome = Result<Value, Value>;

/// Why [`RuntimeApi::try_invoke`] has no [`Outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unanswered {
    #[error("the function did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the Runtime API dropped the invocation unanswered")]
    Dropped,
}

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Serve the Extensions API. Without it its routes answer 404, as a Runtime API emulator
    /// that has none would.
    pub extensions_api: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            extensions_api: true,
        }
    }
}

struct Queued {
    event: Value,
    answer: oneshot::Sender<Outcome>,
}

/// When one invocation's event was handed to the function, when its answer arrived, and when
/// the runtime and every extension had asked for their next event after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvocationTiming {
    pub delivered: Instant,
    pub answered: Instant,
    /// `None` until the invocation is settled.
    pub settled: Option<Instant>,
}

impl InvocationTiming {
    /// From handing the event out to the answer: what the caller waits.
    pub fn duration(&self) -> Duration {
        self.answered.saturating_duration_since(self.delivered)
    }
}

/// Something the server saw or did, in [`RuntimeApi::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An extension registered.
    Registered { name: String },
    /// An event handed to the runtime (and to every extension registered for `INVOKE`).
    Delivered { request_id: String },
    /// The runtime posted the invocation's response or error: the caller has it from here.
    Answered { request_id: String },
    /// The runtime asked for its next event.
    RuntimeNext,
    /// An extension asked for its next event.
    ExtensionNext { name: String },
    /// The runtime and every extension are waiting for their next event: the invocation (or,
    /// with `None`, the init) is over.
    Settled { request_id: Option<String> },
    /// The function's process was stopped.
    Frozen,
    /// The function's process was continued, just before an event was handed out.
    Thawed,
}

/// An [`Event`] and when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub at: Instant,
    pub event: Event,
}

/// What an event hands to the runtime and the extensions.
struct Delivery {
    request_id: String,
    event: Value,
    deadline_ms: u128,
    trace_id: String,
}

struct Extension {
    id: String,
    name: String,
    invoke: bool,
    /// Its `next` long poll, while it waits.
    waiting: Option<oneshot::Sender<Value>>,
}

/// Who waits for what; one lock, so that "everyone is waiting" is one consistent look.
#[derive(Default)]
struct Lifecycle {
    /// The runtime's `next` long poll, while it waits.
    runtime: Option<oneshot::Sender<Delivery>>,
    extensions: Vec<Extension>,
    /// Registration closes with the first event handed out.
    invoked: bool,
    /// The invocation handed out and not settled yet.
    current: Option<String>,
    /// Set once init has settled.
    init_settled: bool,
    freeze_pid: Option<i32>,
    frozen: bool,
    log: Vec<Logged>,
    /// Events handed out and not answered yet, by request id, with when.
    in_flight: HashMap<String, (oneshot::Sender<Outcome>, Instant)>,
    /// Answered invocations, in the order of their answers.
    timings: Vec<(String, InvocationTiming)>,
    init_error: Option<Value>,
    /// Set by [`RuntimeApi::fail_extension_next`]: every extension `next` is answered 500.
    extension_fault: bool,
    next_polls: usize,
    first_poll: Option<Instant>,
}

impl Lifecycle {
    fn everyone_waits(&self) -> bool {
        self.runtime.is_some() && self.extensions.iter().all(|e| e.waiting.is_some())
    }
}

struct State {
    function_name: String,
    function_arn: String,
    options: Options,
    lifecycle: Mutex<Lifecycle>,
    /// A party started waiting for its next event: the dispatcher looks again.
    waiting: Notify,
    /// Bumped on every logged event, for waiting on one.
    changes: watch::Sender<u64>,
    /// The number of runtime `next` polls so far.
    polls_seen: watch::Sender<usize>,
    ids: AtomicU64,
}

impl State {
    fn log(&self, lifecycle: &mut Lifecycle, event: Event) {
        lifecycle.log.push(Logged {
            at: Instant::now(),
            event,
        });
        self.changes.send_modify(|n| *n += 1);
    }
}

/// The server. It stops (and drops its connections) when this value is dropped, and continues
/// a process it froze.
pub struct RuntimeApi {
    addr: SocketAddr,
    state: Arc<State>,
    queue: mpsc::UnboundedSender<Queued>,
    tasks: Vec<JoinHandle<()>>,
}

impl RuntimeApi {
    pub async fn start(function_name: &str) -> Self {
        Self::start_with(function_name, Options::default()).await
    }

    pub async fn start_with(function_name: &str, options: Options) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (queue, queued) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            function_name: function_name.to_owned(),
            function_arn: format!("arn:aws:lambda:us-east-1:123456789012:function:{function_name}"),
            options,
            lifecycle: Mutex::default(),
            waiting: Notify::new(),
            changes: watch::Sender::new(0),
            polls_seen: watch::Sender::new(0),
            ids: AtomicU64::new(1),
        });
        let tasks = vec![
            tokio::spawn(serve(listener, state.clone())),
            tokio::spawn(dispatch(queued, state.clone())),
        ];
        Self {
            addr,
            state,
            queue,
            tasks,
        }
    }

    /// The value of `AWS_LAMBDA_RUNTIME_API`: `127.0.0.1:<port>`.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// Freezes the process `pid` whenever an invocation (or the init) is settled and no event
    /// waits, and thaws it when the next event is handed out. Takes effect at the next
    /// settlement.
    pub fn freeze(&self, pid: u32) {
        let pid = i32::try_from(pid).expect("a pid fits in pid_t");
        self.state.lifecycle.lock().unwrap().freeze_pid = Some(pid);
    }

    /// Queues `event` for the function's next `/next` and awaits its answer. The returned future
    /// panics if there is no answer within `within`.
    pub fn invoke(&self, event: Value, within: Duration) -> impl Future<Output = Outcome> {
        let answer = self.try_invoke(event, within);
        async move { answer.await.unwrap_or_else(|e| panic!("{e}")) }
    }

    /// [`invoke`](Self::invoke), with no answer as an error rather than a panic: for callers
    /// that report it (the benchmark) or add the function's output to it.
    pub fn try_invoke(
        &self,
        event: Value,
        within: Duration,
    ) -> impl Future<Output = Result<Outcome, Unanswered>> {
        let (answer, rx) = oneshot::channel();
        self.queue
            .send(Queued { event, answer })
            .unwrap_or_else(|_| unreachable!("the dispatcher runs as long as `self`"));
        async move {
            match tokio::time::timeout(within, rx).await {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(_)) => Err(Unanswered::Dropped),
                Err(_) => Err(Unanswered::Timeout(within)),
            }
        }
    }

    /// From now on, answers every extension's `event/next` with a 500 instead of an event,
    /// the polls waiting now included: the extensions' loops end, as they would on a broken
    /// Extensions API. Nothing settles after that (an extension that stopped asking is not
    /// waiting), as Lambda then holds each invocation until the function's timeout.
    pub fn fail_extension_next(&self) {
        let mut lifecycle = self.state.lifecycle.lock().unwrap();
        lifecycle.extension_fault = true;
        for extension in &mut lifecycle.extensions {
            // Dropped, the waiting poll answers with an error (see `extension_next`).
            extension.waiting = None;
        }
    }

    /// The body of `POST /runtime/init/error`, if the function reported one.
    pub fn init_error(&self) -> Option<Value> {
        self.state.lifecycle.lock().unwrap().init_error.clone()
    }

    /// How many times the runtime has asked for an event (including the poll still waiting).
    pub fn next_polls(&self) -> usize {
        self.state.lifecycle.lock().unwrap().next_polls
    }

    /// When the runtime first asked for an event: the end of its initialisation.
    pub fn first_poll_at(&self) -> Option<Instant> {
        self.state.lifecycle.lock().unwrap().first_poll
    }

    /// Waits until the runtime has asked for an event `n` times in all; `false` if that did not
    /// happen `within`.
    pub async fn wait_for_polls(&self, n: usize, within: Duration) -> bool {
        let mut polls = self.state.polls_seen.subscribe();
        let seen = tokio::time::timeout(within, polls.wait_for(|seen| *seen >= n)).await;
        matches!(seen, Ok(Ok(_)))
    }

    /// Every answered invocation so far, in the order the answers came.
    pub fn timings(&self) -> Vec<InvocationTiming> {
        let lifecycle = self.state.lifecycle.lock().unwrap();
        lifecycle.timings.iter().map(|(_, t)| *t).collect()
    }

    /// Everything the server saw or did so far, in order.
    pub fn events(&self) -> Vec<Logged> {
        self.state.lifecycle.lock().unwrap().log.clone()
    }

    /// Whether the function's process is frozen now.
    pub fn is_frozen(&self) -> bool {
        self.state.lifecycle.lock().unwrap().frozen
    }

    /// Waits until `done` holds for the events so far; `false` if it did not `within`.
    pub async fn wait_for(&self, within: Duration, done: impl Fn(&[Logged]) -> bool) -> bool {
        let mut changes = self.state.changes.subscribe();
        let waited = tokio::time::timeout(within, async {
            loop {
                if done(&self.state.lifecycle.lock().unwrap().log) {
                    return;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        waited.is_ok()
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // A process left stopped would outlive its test.
        let mut lifecycle = self.state.lifecycle.lock().unwrap();
        if let (true, Some(pid)) = (lifecycle.frozen, lifecycle.freeze_pid) {
            signal(pid, libc::SIGCONT);
            lifecycle.frozen = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::extensions::EXTENSION_ID;
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WITHIN: Duration = Duration::from_secs(5);

    /// One request on its own connection: (status, headers in lower case, JSON body).
    async fn call(
        api: &RuntimeApi,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, HashMap<String, String>, Value) {
        let mut stream = tokio::net::TcpStream::connect(api.addr).await.unwrap();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\ncontent-length: {}\r\n",
            api.addr,
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
        let mut lines = head.lines();
        let status = lines.next().unwrap().split(' ').nth(1).unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let body = serde_json::from_str(body).unwrap_or(Value::Null);
        (status.parse().unwrap(), headers, body)
    }

    async fn register(api: &RuntimeApi, events: &[&str]) -> String {
        let body = json!({ "events": events }).to_string();
        let (status, headers, function) = call(
            api,
            "POST",
            "/2020-01-01/extension/register",
            &[
                ("lambda-extension-name", "test-extension"),
                ("lambda-extension-accept-feature", "accountId"),
            ],
            &body,
        )
        .await;
        assert_eq!(status, 200, "{function}");
        assert_eq!(function["functionName"], "fn", "{function}");
        assert_eq!(function["accountId"], "123456789012", "{function}");
        headers[EXTENSION_ID].clone()
    }

    fn spawn_call(
        api: &RuntimeApi,
        method: &'static str,
        path: &'static str,
        extension: Option<String>,
    ) -> JoinHandle<(u16, HashMap<String, String>, Value)> {
        // A second handle on the same server for the task (the test keeps `api`).
        let api = RuntimeApi {
            addr: api.addr,
            state: api.state.clone(),
            queue: api.queue.clone(),
            tasks: Vec::new(),
        };
        tokio::spawn(async move {
            let headers: Vec<(&str, &str)> = match &extension {
                Some(id) => vec![(EXTENSION_ID, id.as_str())],
                None => Vec::new(),
            };
            call(&api, method, path, &headers, "").await
        })
    }

    fn delivered(log: &[Logged]) -> bool {
        log.iter()
            .any(|l| matches!(l.event, Event::Delivered { .. }))
    }

    #[tokio::test]
    async fn an_event_waits_for_every_extension_but_its_answer_does_not() {
        let api = RuntimeApi::start("fn").await;
        let extension = register(&api, &["INVOKE"]).await;
        let runtime = spawn_call(&api, "GET", "/2018-06-01/runtime/invocation/next", None);
        let answer = api.invoke(json!({"n": 1}), WITHIN);
        assert!(api.wait_for_polls(1, WITHIN).await);
        // The runtime waits, the extension has not asked yet: nothing may be handed out.
        assert!(!api.wait_for(Duration::from_millis(200), delivered).await);

        let ext = spawn_call(
            &api,
            "GET",
            "/2020-01-01/extension/event/next",
            Some(extension.clone()),
        );
        let (status, headers, event) = runtime.await.unwrap();
        assert_eq!((status, event), (200, json!({"n": 1})));
        let id = headers["lambda-runtime-aws-request-id"].clone();
        let (status, _, invoke) = ext.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(invoke["eventType"], "INVOKE");
        assert_eq!(invoke["requestId"], id.as_str());
        assert!(invoke["deadlineMs"].is_u64() && invoke["tracing"]["value"].is_string());

        // The caller has its answer as soon as the runtime posts it...
        let path = format!("/2018-06-01/runtime/invocation/{id}/response");
        let (status, _, _) = call(&api, "POST", &path, &[], r#"{"ok":true}"#).await;
        assert_eq!(status, 202);
        assert_eq!(answer.await, Ok(json!({"ok": true})));
        // ...but the invocation is over only once the extension asks again, after the runtime.
        let _runtime = spawn_call(&api, "GET", "/2018-06-01/runtime/invocation/next", None);
        assert!(api.wait_for_polls(2, WITHIN).await);
        let settled = |log: &[Logged]| {
            log.iter().any(|l| {
                matches!(
                    l.event,
                    Event::Settled {
                        request_id: Some(_)
                    }
                )
            })
        };
        assert!(!api.wait_for(Duration::from_millis(200), settled).await);
        let _ext = spawn_call(
            &api,
            "GET",
            "/2020-01-01/extension/event/next",
            Some(extension),
        );
        assert!(api.wait_for(WITHIN, settled).await);
        let timing = api.timings()[0];
        assert!(timing.settled.is_some_and(|s| s >= timing.answered));

        // Registration closed with the first event.
        let (status, _, _) = call(
            &api,
            "POST",
            "/2020-01-01/extension/register",
            &[("lambda-extension-name", "late")],
            r#"{"events":["INVOKE"]}"#,
        )
        .await;
        assert_eq!(status, 403);
    }

    #[tokio::test]
    async fn without_the_extensions_api_its_routes_are_not_found() {
        let api = RuntimeApi::start_with(
            "fn",
            Options {
                extensions_api: false,
            },
        )
        .await;
        let (status, _, _) = call(
            &api,
            "POST",
            "/2020-01-01/extension/register",
            &[("lambda-extension-name", "x")],
            r#"{"events":["INVOKE"]}"#,
        )
        .await;
        assert_eq!(status, 404);
    }

    #[tokio::test]
    async fn a_failed_extension_next_answers_an_error_and_nothing_settles_after() {
        let api = RuntimeApi::start("fn").await;
        let extension = register(&api, &["INVOKE"]).await;
        let waiting = spawn_call(
            &api,
            "GET",
            "/2020-01-01/extension/event/next",
            Some(extension.clone()),
        );
        let _runtime = spawn_call(&api, "GET", "/2018-06-01/runtime/invocation/next", None);
        let init_settled = |log: &[Logged]| {
            log.iter()
                .any(|l| l.event == Event::Settled { request_id: None })
        };
        assert!(api.wait_for(WITHIN, init_settled).await);

        api.fail_extension_next();
        let (status, _, body) = waiting.await.unwrap();
        assert_eq!(
            (status, &body["errorType"]),
            (500, &json!("Extension.Fault"))
        );
        let again = spawn_call(
            &api,
            "GET",
            "/2020-01-01/extension/event/next",
            Some(extension),
        );
        assert_eq!(again.await.unwrap().0, 500);
        // The extension no longer waits: an event stays queued.
        let _answer = api.invoke(json!({}), WITHIN);
        assert!(!api.wait_for(Duration::from_millis(200), delivered).await);
    }

    fn process_state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // The state follows the command name's closing parenthesis.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.chars().next().unwrap()
    }

    /// Until the process is (or is not) stopped: a signal takes effect when the kernel delivers
    /// it, a moment after kill(2) returns.
    async fn stopped_is(pid: u32, stopped: bool) -> bool {
        for _ in 0..1000 {
            if (process_state(pid) == 'T') == stopped {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_settled_process_is_frozen_until_the_next_event() {
        let mut child = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let api = RuntimeApi::start("fn").await;
        api.freeze(pid);
        let runtime = spawn_call(&api, "GET", "/2018-06-01/runtime/invocation/next", None);
        let frozen = |log: &[Logged]| log.iter().any(|l| l.event == Event::Frozen);
        assert!(api.wait_for(WITHIN, frozen).await);
        assert!(stopped_is(pid, true).await);

        let _answer = api.invoke(json!({}), WITHIN);
        runtime.await.unwrap();
        assert!(!api.is_frozen());
        assert!(stopped_is(pid, false).await);
        let log = api.events();
        let thawed = log.iter().position(|l| l.event == Event::Thawed).unwrap();
        assert!(
            matches!(log[thawed + 1].event, Event::Delivered { .. }),
            "{log:?}"
        );
        child.kill().await.unwrap();
    }
}
