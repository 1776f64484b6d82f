//! Every AWS call is bounded: a table call (or the AUTH token's read at cold start) sent on a
//! connection that never answers times out, is retried on a new connection, and fails within
//! its operation timeout instead of hanging until the function's own timeout.
//!
//! moto behind a proxy that swallows connections ([`DelayProxy::swallow_connections`]):
//! accepted, read, never answered, as a pooled connection whose peer died while the environment
//! was frozen, or a route that drops packets.

use std::net::SocketAddr;
use std::time::Duration;

use local_stack::proxy::DelayProxy;
use product_cache::cache::RedisCache;
use product_cache::config::InvalidationMode::Delete;
use product_cache::config::{AwsTimeouts, CacheSettings, ReadSettings, RedisSettings};
use product_cache::read::ReadPath;
use product_cache::StartupError;
use serde_json::{json, Value};

use crate::lambda_binaries::{get_product_event, http_parts, Function};
use crate::support::{http_get, moto_endpoint, token_secret, TestEnv};

/// Bound on an answer that must come: generous against the operation timeouts used here.
const WITHIN: Duration = Duration::from_secs(10);

fn item() -> Value {
    json!({"name": "Product kb-001", "price": 129.99, "productId": "kb-001"})
}

/// moto behind a proxy of its own (no delay).
async fn moto_proxy() -> DelayProxy {
    let moto: SocketAddr = moto_endpoint()
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("moto endpoint {}", moto_endpoint()));
    DelayProxy::start(moto, Duration::ZERO).await.unwrap()
}

fn endpoint(proxy: &DelayProxy) -> String {
    format!("http://{}", proxy.addr())
}

fn timeouts(attempt_ms: u64, operation_ms: u64) -> AwsTimeouts {
    AwsTimeouts {
        attempt: Duration::from_millis(attempt_ms),
        operation: Duration::from_millis(operation_ms),
    }
}

/// The read path over `env`'s Redis and table, its table reached through `proxy`, built as the
/// read function builds it.
async fn read_through(
    env: &TestEnv,
    proxy: &DelayProxy,
    table_timeouts: AwsTimeouts,
) -> ReadPath<RedisCache, product_cache::store::DynamoStore> {
    let sdk = local_stack::table::local_sdk_config(&endpoint(proxy)).await;
    let settings = ReadSettings {
        table_timeouts,
        ..ReadSettings::new(
            RedisSettings::new(env.redis.url()),
            &env.table,
            CacheSettings::default(),
        )
    };
    ReadPath::build(settings, &sdk).await.unwrap()
}

/// HTTP requests in what a connection received: one request line each.
fn requests(received: &[u8]) -> usize {
    String::from_utf8_lossy(received)
        .matches(" HTTP/1.1\r\n")
        .count()
}

#[tokio::test]
async fn a_table_call_on_a_connection_that_never_answers_is_retried_on_a_new_one() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let proxy = moto_proxy().await;
    proxy.swallow_connections(1);
    let read = read_through(&env, &proxy, timeouts(500, 3000)).await;

    let answer = tokio::time::timeout(WITHIN, http_get(&read, "/products/kb-001"))
        .await
        .expect("the read did not answer");
    assert_eq!(answer, (200, "miss".into(), item()));
    let swallowed = proxy.swallowed();
    assert_eq!(swallowed.len(), 1, "one connection swallowed");
    assert_eq!(
        requests(&swallowed[0]),
        1,
        "the retry went out on the connection that never answered: {:?}",
        String::from_utf8_lossy(&swallowed[0])
    );
    assert_eq!(proxy.connections(), 2, "the retry's connection is new");
}

#[tokio::test]
async fn a_table_that_never_answers_is_a_503_not_a_hang() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let proxy = moto_proxy().await;
    proxy.swallow_connections(u64::MAX);
    let read = read_through(&env, &proxy, timeouts(300, 1500)).await;

    let (code, _, body) = tokio::time::timeout(WITHIN, http_get(&read, "/products/kb-001"))
        .await
        .unwrap_or_else(|_| panic!("the read did not answer within {WITHIN:?}"));
    assert_eq!(
        (code, &body["error"]),
        (503, &json!("unavailable")),
        "{body}"
    );
    assert!(
        proxy.swallowed().iter().any(|c| requests(c) > 0),
        "the GetItem never reached the proxy"
    );
}

/// The AUTH token's read holds up the cold start: bounded by the Redis connect budget.
#[tokio::test]
async fn a_secrets_manager_that_never_answers_fails_the_cold_start_within_the_connect_budget() {
    let arn = token_secret("a-token").await;
    let proxy = moto_proxy().await;
    proxy.swallow_connections(u64::MAX);
    let sdk = local_stack::table::local_sdk_config(&endpoint(&proxy)).await;
    let redis = RedisSettings {
        auth_secret_arn: Some(arn),
        connect_timeout: Duration::from_millis(1000),
        // Never reached: the token comes first.
        ..RedisSettings::new("redis://127.0.0.1:1")
    };
    let built = tokio::time::timeout(
        WITHIN,
        RedisCache::from_settings(&redis, &CacheSettings::default(), &sdk),
    )
    .await
    .unwrap_or_else(|_| panic!("the cold start did not end within {WITHIN:?}"));
    match built {
        Err(StartupError::Secret(e)) => {
            assert!(
                proxy.swallowed().iter().any(|c| requests(c) > 0),
                "GetSecretValue never reached the proxy ({e})"
            )
        }
        Err(e) => panic!("expected the secret's read to fail, got {e}"),
        Ok(_) => panic!("read a token from a Secrets Manager that never answers"),
    }
}

/// The compiled read function, its table behind the proxy, its timeouts from the environment.
async fn read_function(env: &TestEnv, proxy: &DelayProxy) -> Function {
    let (url, endpoint) = (env.redis.url(), endpoint(proxy));
    Function::spawn(
        "read-function",
        &[
            ("REDIS_URL", &url),
            ("TABLE_NAME", &env.table),
            ("AWS_ENDPOINT_URL_DYNAMODB", &endpoint),
            ("DYNAMODB_ATTEMPT_TIMEOUT_MS", "500"),
            ("DYNAMODB_TIMEOUT_MS", "2000"),
        ],
    )
    .await
}

#[tokio::test]
async fn the_read_function_binary_bounds_its_table_calls() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;

    // The first connection never answers: retried on a new one.
    let proxy = moto_proxy().await;
    proxy.swallow_connections(1);
    let mut function = read_function(&env, &proxy).await;
    let answer = function
        .respond(get_product_event("kb-001", "kb-001"))
        .await;
    let (status, _, body) = http_parts(&answer);
    assert_eq!((status, body), (200, item()), "{answer}");
    let swallowed = proxy.swallowed();
    assert_eq!(swallowed.len(), 1);
    assert_eq!(requests(&swallowed[0]), 1);
    drop(function);

    // None ever answers: a 503 within the invocation's bound.
    let proxy = moto_proxy().await;
    proxy.swallow_connections(u64::MAX);
    let mut function = read_function(&env, &proxy).await;
    let answer = function
        .respond(get_product_event("kb-001", "kb-001"))
        .await;
    let (status, _, body) = http_parts(&answer);
    assert_eq!(
        (status, &body["error"]),
        (503, &json!("unavailable")),
        "{answer}"
    );
    let output = function.output().await;
    assert!(output.contains("answering 503"), "{output}");
}
