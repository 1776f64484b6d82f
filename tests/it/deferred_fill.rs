//! The read function answers a miss before its fill, and Lambda cannot freeze it before the
//! fill has landed: the compiled binary under the local Runtime API with freezing on (the
//! process is stopped whenever an invocation is over and no event waits, as Lambda freezes an
//! execution environment), Redis behind a delaying proxy so that the fill clearly outlasts the
//! response.
//!
//! The guard-off run is `read-function-unguarded` (`tests/bin`): the same library with the fill
//! still after the response but merely spawned, no extension holding the invocation. The same
//! scenario then finds the key unfilled while the environment is frozen.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use local_stack::proxy::DelayProxy;
use local_stack::runtime_api::{Event, Logged, Options};
use product_cache::config::InvalidationMode::Delete;
use serde_json::{json, Value};

use crate::lambda_binaries::{get_product_event, http_parts, Function};
use crate::metrics::parse_emf;
use crate::support::{fixture, TestEnv};

/// Per round trip through the proxy: enough that a fill of three round trips takes far longer
/// than posting a response and asking for the next event.
const ROUND_TRIP: Duration = Duration::from_millis(50);
const WITHIN: Duration = Duration::from_secs(15);
const KEY: &str = "product:kb-001";

fn item() -> Value {
    json!({"name": "Product kb-001", "price": 129.99, "productId": "kb-001"})
}

/// The production binary or the guard-off one.
fn read_function(guarded: bool) -> (&'static str, PathBuf) {
    if guarded {
        let name = "read-function";
        (name, crate::support::binary(name))
    } else {
        let name = "read-function-unguarded";
        (
            name,
            PathBuf::from(env!("CARGO_BIN_EXE_read-function-unguarded")),
        )
    }
}

struct Frozen {
    env: TestEnv,
    function: Function,
    _proxy: Option<DelayProxy>,
}

/// The function with freezing on, over Redis through a [`ROUND_TRIP`] proxy if `delayed`,
/// connected (past the bypasses of its first requests) and with an empty script cache.
async fn frozen_function(guarded: bool, options: Options, delayed: bool) -> Frozen {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    env.put_product("warm-up", "1").await;
    let proxy = if delayed {
        let redis: SocketAddr = ([127, 0, 0, 1], env.redis.port()).into();
        Some(DelayProxy::start(redis, ROUND_TRIP).await.unwrap())
    } else {
        None
    };
    let url = proxy
        .as_ref()
        .map_or_else(|| env.redis.url(), DelayProxy::redis_url);
    let (name, path) = read_function(guarded);
    let function = Function::spawn_from(
        name,
        path,
        options,
        &[
            ("REDIS_URL", &url),
            ("TABLE_NAME", &env.table),
            // Several round trips must never time out, and a fill frozen mid-way must still be
            // within its budget and its lease once thawed: tokio's clock runs on while stopped.
            ("REDIS_TIMEOUT_MS", "10000"),
            ("LEASE_MS", "60000"),
        ],
    )
    .await;
    function.api().freeze(function.pid());
    let mut frozen = Frozen {
        env,
        function,
        _proxy: proxy,
    };
    // The connection forms in the background; until then reads bypass the cache.
    let mut seen = Vec::new();
    for _ in 0..50 {
        let answer = frozen
            .function
            .respond(get_product_event("warm-up", "warm-up"))
            .await;
        seen.push(http_parts(&answer).1);
        if seen.last().map(String::as_str) != Some("bypass") {
            break;
        }
    }
    assert_ne!(seen.last().map(String::as_str), Some("bypass"), "{seen:?}");
    frozen.function.settled().await;
    // An empty script cache, as after a failover or a node replacement: the fill is then three
    // round trips (EVALSHA answered NOSCRIPT, SCRIPT LOAD, EVALSHA).
    let mut conn = frozen.env.redis_conn().await;
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    frozen
}

/// A miss answered; then, once its invocation is over and the process frozen, what Redis holds.
struct Miss {
    request_id: String,
    body: String,
    cached_while_frozen: Option<String>,
}

async fn miss(frozen: &mut Frozen) -> Miss {
    let from = frozen.function.api().events().len();
    let answer = frozen
        .function
        .respond(fixture("apigw-get-product.json"))
        .await;
    assert_eq!(
        http_parts(&answer),
        (200, "miss".into(), item()),
        "{answer}"
    );
    let request_id = frozen.function.api().events()[from..]
        .iter()
        .find_map(|l| match &l.event {
            Event::Answered { request_id } => Some(request_id.clone()),
            _ => None,
        })
        .expect("the miss was answered");
    let over = |log: &[Logged]| {
        position(log, |e| is_settled(e, &request_id))
            .is_some_and(|settled| log[settled..].iter().any(|l| l.event == Event::Frozen))
    };
    assert!(
        frozen.function.api().wait_for(WITHIN, over).await,
        "not frozen after the miss: {:?}",
        frozen.function.api().events()
    );
    assert!(frozen.function.api().is_frozen());
    let cached_while_frozen = frozen.env.raw_get(KEY).await;
    Miss {
        request_id,
        body: answer["body"].as_str().unwrap().to_owned(),
        cached_while_frozen,
    }
}

fn position(log: &[Logged], what: impl Fn(&Event) -> bool) -> Option<usize> {
    log.iter().position(|l| what(&l.event))
}

fn is_settled(event: &Event, id: &str) -> bool {
    matches!(event, Event::Settled { request_id: Some(r) } if r == id)
}

fn is_extension_next(event: &Event) -> bool {
    matches!(event, Event::ExtensionNext { .. })
}

/// EMF lines the function has written so far.
async fn metrics_lines(function: &mut Function) -> Vec<String> {
    let output = function.output().await;
    output
        .lines()
        .filter(|l| parse_emf(l).is_some())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_miss_answers_before_its_fill_and_is_not_frozen_until_the_fill_landed() {
    let mut frozen = frozen_function(true, Options::default(), true).await;
    let miss = miss(&mut frozen).await;
    assert_eq!(
        miss.cached_while_frozen.as_deref(),
        Some(miss.body.as_str()),
        "the environment was frozen before the fill landed"
    );

    // In Lambda's order: the response went out, the runtime asked for its next event at once,
    // and the extension asked for its own only after the fill: the invocation was over then.
    let log = frozen.function.api().events();
    let id = &miss.request_id;
    let delivered = position(&log, |e| {
        *e == Event::Delivered {
            request_id: id.clone(),
        }
    });
    let delivered = delivered.expect("delivered");
    let answered = position(&log, |e| {
        *e == Event::Answered {
            request_id: id.clone(),
        }
    })
    .unwrap();
    let after = |i: usize, what: &dyn Fn(&Event) -> bool| {
        i + 1 + position(&log[i + 1..], what).unwrap_or_else(|| panic!("{log:?}"))
    };
    let runtime_next = after(answered, &|e| *e == Event::RuntimeNext);
    let extension_next = after(delivered, &is_extension_next);
    let settled = position(&log, |e| is_settled(e, id)).unwrap();
    assert!(delivered < answered, "{log:?}");
    assert!(
        answered < runtime_next && runtime_next < extension_next,
        "the extension did not hold the invocation past the response: {log:?}"
    );
    assert_eq!(settled, extension_next + 1, "{log:?}");

    // The miss's metrics line, which comes after the fill, was written before the freeze: the
    // process has stayed frozen since, and nothing stopped can write.
    let invocations = log
        .iter()
        .filter(|l| matches!(l.event, Event::Delivered { .. }))
        .count();
    let mut lines = Vec::new();
    for _ in 0..500 {
        lines = metrics_lines(&mut frozen.function).await;
        if lines.len() >= invocations {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        lines.len(),
        invocations,
        "one line per invocation: {lines:?}"
    );
    assert!(frozen.function.api().is_frozen());
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["Misses"], json!(1), "{last}");
}

/// The guard-off run: the same scenario without the extension.
#[tokio::test]
async fn without_the_extension_the_fill_is_frozen_with_the_environment_and_lands_late() {
    let mut frozen = frozen_function(false, Options::default(), true).await;
    let miss = miss(&mut frozen).await;
    assert_eq!(
        miss.cached_while_frozen, None,
        "filled before the freeze although nothing held the invocation"
    );
    assert!(
        !frozen
            .function
            .api()
            .events()
            .iter()
            .any(|l| is_extension_next(&l.event)),
        "the guard-off binary registered an extension"
    );

    // The next event thaws the process, and the fill, stopped half-way, goes on from there.
    let bad = frozen
        .function
        .respond(get_product_event("{bad}", "%7Bbad%7D"))
        .await;
    assert_eq!(http_parts(&bad).0, 400);
    let mut cached = None;
    for _ in 0..500 {
        cached = frozen.env.raw_get(KEY).await;
        if cached.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cached.as_deref(), Some(miss.body.as_str()), "never filled");
}

/// Every invocation ends, with or without after-work: the extension asks for its next event
/// once per invocation, also for hits, bad requests and events that never reach the handler.
#[tokio::test]
async fn the_extension_ends_every_invocation_hits_and_bad_requests_included() {
    let mut frozen = frozen_function(true, Options::default(), false).await;
    let miss = miss(&mut frozen).await;
    assert_eq!(
        miss.cached_while_frozen.as_deref(),
        Some(miss.body.as_str())
    );
    for round in 0..3 {
        let hit = frozen
            .function
            .respond(fixture("apigw-get-product.json"))
            .await;
        assert_eq!(
            http_parts(&hit),
            (200, "hit".into(), item()),
            "round {round}"
        );
        let bad = frozen
            .function
            .respond(get_product_event("{bad}", "%7Bbad%7D"))
            .await;
        assert_eq!(http_parts(&bad).0, 400, "round {round}");
        let not_http = frozen.function.invoke(json!({"hello": "world"})).await;
        assert!(not_http.is_err(), "round {round}: {not_http:?}");
    }
    frozen.function.settled().await;

    let log = frozen.function.api().events();
    let count = |what: &dyn Fn(&Event) -> bool| log.iter().filter(|l| what(&l.event)).count();
    let delivered = count(&|e| matches!(e, Event::Delivered { .. }));
    let settled = count(&|e| {
        matches!(
            e,
            Event::Settled {
                request_id: Some(_)
            }
        )
    });
    let registered = count(&|e| {
        *e == Event::Registered {
            name: product_cache::read::deferred::EXTENSION_NAME.into(),
        }
    });
    assert_eq!(registered, 1, "{log:?}");
    assert_eq!(settled, delivered, "{log:?}");
    // One `next` after init and one after each invocation.
    assert_eq!(count(&is_extension_next), delivered + 1, "{log:?}");
}

/// A Runtime API without the Extensions API: one warning, then each fill runs before its
/// response, so a miss is cached by the time it is answered.
#[tokio::test]
async fn without_an_extensions_api_the_fill_runs_before_the_response() {
    let options = Options {
        extensions_api: false,
    };
    let mut frozen = frozen_function(true, options, true).await;
    let answer = frozen
        .function
        .respond(fixture("apigw-get-product.json"))
        .await;
    assert_eq!(http_parts(&answer), (200, "miss".into(), item()));
    assert_eq!(
        frozen.env.raw_get(KEY).await.as_deref(),
        answer["body"].as_str(),
        "answered before the fill"
    );
    let hit = frozen
        .function
        .respond(fixture("apigw-get-product.json"))
        .await;
    assert_eq!(http_parts(&hit).1, "hit");
    let output = frozen.function.output().await;
    assert_eq!(
        output.matches("no Lambda Extensions API").count(),
        1,
        "{output}"
    );
}

/// The fill extension's loop ends (its `event/next` answered with an error) while the function
/// is serving: the process exits, non-zero, so that Lambda starts a fresh environment. Serving
/// on would leave an extension registered that never asks again, and Lambda would hold every
/// later invocation until the function's timeout.
#[tokio::test]
async fn when_the_extensions_loop_ends_the_process_exits() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let url = env.redis.url();
    // No freezing: a stopped process could not notice its extension's failure.
    let mut function = Function::spawn(
        "read-function",
        &[("REDIS_URL", &url), ("TABLE_NAME", &env.table)],
    )
    .await;
    let answer = function.respond(fixture("apigw-get-product.json")).await;
    assert_eq!(http_parts(&answer).0, 200, "{answer}");
    function.settled().await;

    function.api().fail_extension_next();
    // Queued now, and never handed out: the extension does not ask again. On Lambda it would
    // go to the fresh environment.
    let _held = function
        .api()
        .invoke(fixture("apigw-get-product.json"), Duration::from_secs(60));
    let status = function.exit_status().await;
    let output = function.output().await;
    assert!(
        !status.success(),
        "exited with {status}, expected a failure; output:\n{output}"
    );
    assert!(
        output.contains("the fill extension stopped"),
        "no error logged; output:\n{output}"
    );
}
