//! The compiled function binaries under a Lambda Runtime API, the way AWS drives them: each test
//! starts a [`RuntimeApi`] on a free port, spawns `target/debug/<function>` pointed at it with the
//! environment Lambda sets, and invokes it with fixture events.
//!
//! Needs the binaries: `cargo build -p functions` first.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use product_cache::config::InvalidationMode::Delete;
use serde_json::{json, Value};

use crate::support::{fixture, moto_endpoint, TestEnv};
use local_stack::function::{FunctionProcess, Launch};
use local_stack::runtime_api::{Options, Outcome, RuntimeApi};

/// Bound on one invocation, start-up included (a cold start builds the SDK client).
const INVOKE_WITHIN: Duration = Duration::from_secs(15);
/// Bound on a function that is expected to exit at start-up.
const EXIT_WITHIN: Duration = Duration::from_secs(15);

/// A function's own environment variables.
type Vars<'a> = &'a [(&'a str, &'a str)];

/// A function binary running under its own [`RuntimeApi`] ([`FunctionProcess`]), whose
/// failures are the test's: each panics with the function's output. Killed when dropped.
pub(crate) struct Function {
    process: FunctionProcess,
}

impl Function {
    /// Spawns `name` with the variables Lambda sets for a custom runtime plus the function's
    /// own `vars`, DynamoDB at the tests' moto. Nothing else is inherited from the test's
    /// environment.
    pub(crate) async fn spawn(name: &'static str, vars: Vars<'_>) -> Self {
        Self::spawn_from(name, crate::support::binary(name), Options::default(), vars).await
    }

    /// [`Function::spawn`] of the binary at `path`, under a Runtime API with `options`.
    pub(crate) async fn spawn_from(
        name: &'static str,
        path: PathBuf,
        options: Options,
        vars: Vars<'_>,
    ) -> Self {
        let mut all = vec![("AWS_ENDPOINT_URL_DYNAMODB", moto_endpoint())];
        all.extend_from_slice(vars);
        let launch = Launch {
            name,
            binary: &path,
            api: options,
            vars: &all,
            echo: std::env::var_os("TEST_LOG").is_some(),
        };
        match FunctionProcess::spawn(launch).await {
            Ok(process) => Self { process },
            Err(e) => panic!("{e}"),
        }
    }

    /// One invocation, as Lambda would make it. Panics, with the function's output, if the
    /// function exits or does not answer instead.
    pub(crate) async fn invoke(&mut self, event: Value) -> Outcome {
        match self.process.invoke(event, INVOKE_WITHIN).await {
            Ok(outcome) => outcome,
            Err(e) => {
                let output = self.output().await;
                panic!("{e}:\n{output}")
            }
        }
    }

    /// An invocation that must succeed: the body the function posted to `/response`.
    pub(crate) async fn respond(&mut self, event: Value) -> Value {
        match self.invoke(event).await {
            Ok(response) => response,
            Err(error) => {
                let output = self.output().await;
                panic!(
                    "{} reported an invocation error {error}; output:\n{output}",
                    self.process.name()
                )
            }
        }
    }

    /// Waits for a function that should stop by itself.
    pub(crate) async fn exit_status(&mut self) -> ExitStatus {
        match self.process.exit_status(EXIT_WITHIN).await {
            Ok(status) => status,
            Err(e) => {
                let output = self.output().await;
                panic!("{e}; output:\n{output}")
            }
        }
    }

    /// Waits until the last invocation handed out is over: the runtime and every extension have
    /// asked for their next event, so its after-work (a miss's fill, the metrics line) is done.
    pub(crate) async fn settled(&self) {
        assert!(
            self.process.settled(INVOKE_WITHIN).await,
            "the last invocation was not settled within {INVOKE_WITHIN:?}; events: {:?}",
            self.api().events()
        );
    }

    pub(crate) fn api(&self) -> &RuntimeApi {
        self.process.api()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid().expect("running")
    }

    fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Everything the function printed. Complete once it has exited.
    pub(crate) async fn output(&mut self) -> String {
        self.process.output().await
    }
}

/// `GET /products/{id}` as API Gateway (HTTP API, payload 2.0) sends it, with `id` as the path
/// parameter.
pub(crate) fn get_product_event(id: &str, raw_path_id: &str) -> Value {
    let mut event = fixture("apigw-get-product.json");
    let path = format!("/products/{raw_path_id}");
    event["rawPath"] = json!(path);
    event["requestContext"]["http"]["path"] = json!(path);
    event["pathParameters"]["id"] = json!(id);
    event
}

/// (statusCode, x-cache, JSON body) of an API Gateway v2 proxy response, after checking the parts
/// every answer of the read function shares.
pub(crate) fn http_parts(response: &Value) -> (i64, String, Value) {
    let status = response["statusCode"]
        .as_i64()
        .unwrap_or_else(|| panic!("no statusCode: {response}"));
    assert_eq!(
        response["headers"]["content-type"], "application/json",
        "{response}"
    );
    assert_eq!(response["isBase64Encoded"], false, "{response}");
    let x_cache = response["headers"]["x-cache"]
        .as_str()
        .unwrap_or_else(|| panic!("no x-cache header: {response}"))
        .to_owned();
    let body = response["body"]
        .as_str()
        .unwrap_or_else(|| panic!("body is not a string: {response}"));
    let body =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {body}"));
    (status, x_cache, body)
}

/// Connections Redis has accepted so far, counting the one that asks.
async fn redis_connections(env: &TestEnv) -> u64 {
    let mut conn = env.redis_conn().await;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total_connections_received in INFO: {info}"))
}

#[tokio::test]
async fn read_function_answers_api_gateway_events_from_one_process() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let redis_url = env.redis.url();
    let mut function = Function::spawn(
        "read-function",
        &[("REDIS_URL", &redis_url), ("TABLE_NAME", &env.table)],
    )
    .await;
    let item = json!({"name": "Product kb-001", "price": 129.99, "productId": "kb-001"});

    let first = function.respond(fixture("apigw-get-product.json")).await;
    assert_eq!(http_parts(&first), (200, "miss".into(), item.clone()));
    // The fill runs after the response, within the invocation.
    function.settled().await;
    assert_eq!(
        env.raw_get("product:kb-001").await.as_deref(),
        first["body"].as_str(),
        "the miss filled the cache with the body it answered"
    );

    // From here on the function must not open a new connection to Redis: the one client built
    // at cold start serves every invocation.
    let connections = redis_connections(&env).await;
    let second = function.respond(fixture("apigw-get-product.json")).await;
    assert_eq!(http_parts(&second), (200, "hit".into(), item.clone()));

    let bad = function
        .respond(get_product_event("{bad}", "%7Bbad%7D"))
        .await;
    let (status, x_cache, body) = http_parts(&bad);
    assert_eq!((status, x_cache.as_str()), (400, "bypass"), "{bad}");
    assert_eq!(body["error"], "invalid_id", "{bad}");

    let missing = function.respond(get_product_event("nope", "nope")).await;
    let (status, x_cache, body) = http_parts(&missing);
    assert_eq!((status, x_cache.as_str()), (404, "miss"), "{missing}");
    assert_eq!(body["error"], "not_found", "{missing}");

    assert_eq!(
        redis_connections(&env).await,
        connections + 1,
        "only this test's own INFO connection is new"
    );

    // An event that is not an HTTP request is reported on /invocation/{id}/error, and the
    // process goes on serving.
    let error = function
        .invoke(json!({"hello": "world"}))
        .await
        .expect_err("a non-HTTP event is an invocation error");
    assert!(error["errorType"].is_string(), "{error}");
    assert!(
        error["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("deserialize")),
        "{error}"
    );

    let again = function.respond(fixture("apigw-get-product.json")).await;
    assert_eq!(http_parts(&again), (200, "hit".into(), item));
    assert!(function.is_running());
    assert_eq!(function.api().init_error(), None);
}

#[tokio::test]
async fn read_function_answers_the_batch_fixture_with_the_encoded_comma_inside_one_id() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    env.put_product("kb,002", "59.5").await;
    let redis_url = env.redis.url();
    let mut function = Function::spawn(
        "read-function",
        &[("REDIS_URL", &redis_url), ("TABLE_NAME", &env.table)],
    )
    .await;
    let event = fixture("apigw-get-products-batch.json");
    // The fixture as API Gateway sends it: the decoded parameter cannot tell the id's comma
    // from the separators, the raw query string can.
    assert_eq!(
        event["queryStringParameters"]["ids"],
        "kb-001,kb,002,kb-003"
    );
    let expected = json!({"products": [
        {"id": "kb-001", "product": {"name": "Product kb-001", "price": 129.99, "productId": "kb-001"}},
        {"id": "kb,002", "product": {"name": "Product kb,002", "price": 59.5, "productId": "kb,002"}},
        {"id": "kb-003", "product": null},
    ]});

    let first = function.respond(event.clone()).await;
    assert_eq!(
        http_parts(&first),
        (200, "hits=0 misses=3 bypasses=0".into(), expected.clone()),
        "{first}"
    );
    // The fills run after the response, within the invocation.
    function.settled().await;
    let cached = env
        .raw_get("product:kb,002")
        .await
        .expect("the batch filled the product whose id holds a comma");
    assert_eq!(
        serde_json::from_str::<Value>(&cached).unwrap(),
        expected["products"][1]["product"]
    );

    let second = function.respond(event).await;
    assert_eq!(
        http_parts(&second),
        (200, "hits=3 misses=0 bypasses=0".into(), expected),
        "{second}"
    );
}

#[tokio::test]
async fn invalidator_function_applies_batches_and_reports_a_redis_outage() {
    let mut env = TestEnv::new(Delete).await;
    let stale = [
        "product:kb-001",
        "product:mouse-002",
        "product:monitor-003",
        "product:untouched",
    ];
    for key in stale {
        env.raw_set(key, r#"{"stale":true}"#).await;
    }
    let redis_url = env.redis.url();
    let mut function = Function::spawn(
        "invalidator-function",
        &[("REDIS_URL", &redis_url), ("INVALIDATION_MODE", "delete")],
    )
    .await;

    let response = function.respond(fixture("batch-mixed.json")).await;
    assert_eq!(response, json!({"batchItemFailures": []}));
    for key in &stale[..3] {
        assert_eq!(env.raw_get(key).await, None, "{key}");
    }
    assert!(env.raw_get("product:untouched").await.is_some());

    // The next fixture's sequence numbers are older than the batch's: start from an empty
    // Redis, or the ordering guard would (rightly) refuse them.
    env.flush().await;
    env.raw_set("product:kb-001", r#"{"stale":true}"#).await;
    env.raw_set("product:mouse-002", r#"{"stale":true}"#).await;
    let response = function.respond(fixture("malformed-record.json")).await;
    assert_eq!(response, json!({"batchItemFailures": []}));
    assert_eq!(env.raw_get("product:kb-001").await, None);
    assert_eq!(env.raw_get("product:mouse-002").await, None);

    env.redis.stop().await;
    let response = function.respond(fixture("batch-mixed.json")).await;
    let first = fixture("batch-mixed.json")["Records"][0]["dynamodb"]["SequenceNumber"].clone();
    assert_eq!(first, "111000000000000000101");
    assert_eq!(
        response,
        json!({"batchItemFailures": [{"itemIdentifier": first}]})
    );
    assert!(
        function.is_running(),
        "a failed batch is an answer, not a crash"
    );
}

#[tokio::test]
async fn invalidator_function_reads_its_mode_from_the_environment() {
    // A refresh-mode Redis: old enough that a record created now is newer than it.
    let env = TestEnv::new(product_cache::config::InvalidationMode::Refresh).await;
    env.raw_set("product:kb-001", r#"{"stale":true}"#).await;
    let redis_url = env.redis.url();
    let mut function = Function::spawn(
        "invalidator-function",
        &[("REDIS_URL", &redis_url), ("INVALIDATION_MODE", "refresh")],
    )
    .await;

    let response = function
        .respond(crate::support::fresh(fixture("modify.json")))
        .await;
    assert_eq!(response, json!({"batchItemFailures": []}));
    let cached: Value =
        serde_json::from_str(&env.raw_get("product:kb-001").await.unwrap()).unwrap();
    assert_eq!(cached["price"], json!(99.99), "{cached}");
}

/// `lambda_runtime` only reports to `/runtime/init/error` for SnapStart hooks. A configuration
/// error returned from `main` before `run` is called never reaches the Runtime API: the process
/// exits non-zero with the error on stderr, which Lambda reports as `Runtime.ExitError`.
#[tokio::test]
async fn a_bad_configuration_stops_the_function_at_start_up_naming_the_variable() {
    let redis = "redis://127.0.0.1:6379";
    // (function, its variables, the variable the error must name)
    let cases: [(&str, Vars, &str); 4] = [
        ("read-function", &[("REDIS_URL", redis)], "TABLE_NAME"),
        ("read-function", &[("TABLE_NAME", "Products")], "REDIS_URL"),
        ("invalidator-function", &[], "REDIS_URL"),
        (
            "invalidator-function",
            &[("REDIS_URL", redis), ("INVALIDATION_MODE", "update")],
            "INVALIDATION_MODE",
        ),
    ];
    for (name, vars, variable) in cases {
        let mut function = Function::spawn(name, vars).await;
        let status = function.exit_status().await;
        let output = function.output().await;
        assert!(
            !status.success(),
            "{name} without {variable}: {status}\n{output}"
        );
        // The readable message, not a Debug dump of the error enum.
        assert!(
            output.contains(&format!("environment variable {variable} ")),
            "{name}: the output does not name {variable}:\n{output}"
        );
        assert_eq!(function.api().init_error(), None, "{name}");
        assert_eq!(
            function.api().next_polls(),
            0,
            "{name} reached the Runtime API before failing"
        );
    }
}

#[tokio::test]
async fn read_function_starts_and_serves_from_the_table_when_redis_is_down() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let closed = format!("redis://127.0.0.1:{}", local_stack::services::free_port());
    let mut function = Function::spawn(
        "read-function",
        &[("REDIS_URL", &closed), ("TABLE_NAME", &env.table)],
    )
    .await;
    let item = json!({"name": "Product kb-001", "price": 129.99, "productId": "kb-001"});
    for _ in 0..2 {
        let response = function.respond(fixture("apigw-get-product.json")).await;
        assert_eq!(http_parts(&response), (200, "bypass".into(), item.clone()));
    }
}

/// The deployed shape: `rediss://` (ElastiCache in-transit encryption) with the AUTH token in
/// Secrets Manager, at the default timeouts. The function trusts the test CA through
/// `REDIS_CA_FILE` (a private CA); without it, the Mozilla roots built in, which Amazon's
/// certificates chain to.
#[tokio::test]
async fn read_function_uses_tls_and_its_auth_token_from_secrets_manager() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let certs = tempfile::tempdir().unwrap();
    crate::support::make_certificates(certs.path(), "IP:127.0.0.1,DNS:localhost");
    let file = |name: &str| certs.path().join(name).to_str().unwrap().to_owned();
    let tls_port = local_stack::services::free_port().to_string();
    let token = "tls-and-auth/token";
    let redis = local_stack::services::RedisServer::start_with(&[
        "--requirepass",
        token,
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &file("server.crt"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.crt"),
        "--tls-auth-clients",
        "no",
    ])
    .await
    .unwrap();

    let arn = crate::support::token_secret(token).await;

    let url = format!("rediss://127.0.0.1:{tls_port}");
    let ca = file("ca.crt");
    let mut function = Function::spawn(
        "read-function",
        &[
            ("REDIS_URL", &url),
            ("REDIS_AUTH_SECRET_ARN", &arn),
            ("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_endpoint()),
            ("REDIS_CA_FILE", &ca),
            ("TABLE_NAME", &env.table),
            // Everything it logs, as JSON: the token must not be in any of it.
            ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
            ("AWS_LAMBDA_LOG_LEVEL", "DEBUG"),
        ],
    )
    .await;
    // The connection forms in the background (TLS handshake, AUTH) within
    // REDIS_CONNECT_TIMEOUT_MS; requests meanwhile answer from the table (`bypass`), never
    // fail. Then the cache serves: a miss fills, the next read hits.
    let mut seen = Vec::new();
    for _ in 0..50 {
        let answer = function.respond(fixture("apigw-get-product.json")).await;
        let (status, x_cache, body) = http_parts(&answer);
        assert_eq!((status, &body["price"]), (200, &json!(129.99)), "{answer}");
        seen.push(x_cache.clone());
        if x_cache == "hit" {
            break;
        }
    }
    let output = function.output().await;
    assert_eq!(
        seen.last().map(String::as_str),
        Some("hit"),
        "{seen:?}\n{output}"
    );
    assert!(seen.contains(&"miss".to_owned()), "{seen:?}");
    assert!(
        !output.contains(token) && !output.contains("129.99"),
        "the AUTH token or an item body was logged:\n{output}"
    );
    drop(redis);
}

/// A frozen execution environment, as Lambda freezes one between invocations: the function
/// process is stopped (SIGSTOP) longer than the server's idle `timeout`, which closes its
/// connections meanwhile; thawed (SIGCONT), its next invocation is served from the cache as
/// usual, and the invalidator's next batch is applied.
#[tokio::test]
async fn both_functions_thaw_after_the_server_closed_their_idle_connections() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let idle = local_stack::services::RedisServer::start_with(&["--timeout", "1"])
        .await
        .unwrap();
    let url = idle.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    // Until the server has closed the function's idle connections: only `conn` itself is left.
    let await_closed = || async {
        for _ in 0..100 {
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut conn)
                .await
                .unwrap();
            if list.lines().count() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the server never closed the idle connections");
    };
    let signal = |function: &Function, sig| {
        let pid = function.pid() as i32;
        // SAFETY: kill(2) with a pid this test spawned and a valid signal number.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    };

    let mut read = Function::spawn(
        "read-function",
        &[("REDIS_URL", &url), ("TABLE_NAME", &env.table)],
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..50 {
        let answer = read.respond(fixture("apigw-get-product.json")).await;
        seen.push(http_parts(&answer).1);
        if seen.last().map(String::as_str) == Some("hit") {
            break;
        }
    }
    assert_eq!(seen.last().map(String::as_str), Some("hit"), "{seen:?}");
    signal(&read, libc::SIGSTOP);
    await_closed().await;
    signal(&read, libc::SIGCONT);
    let answer = read.respond(fixture("apigw-get-product.json")).await;
    assert_eq!(http_parts(&answer).1, "hit", "{answer}");

    let mut invalidator = Function::spawn(
        "invalidator-function",
        &[("REDIS_URL", &url), ("INVALIDATION_MODE", "delete")],
    )
    .await;
    let batch = fixture("batch-mixed.json");
    assert_eq!(
        invalidator.respond(batch.clone()).await,
        json!({"batchItemFailures": []})
    );
    signal(&invalidator, libc::SIGSTOP);
    signal(&read, libc::SIGSTOP);
    await_closed().await;
    signal(&invalidator, libc::SIGCONT);
    signal(&read, libc::SIGCONT);
    assert_eq!(
        invalidator.respond(batch).await,
        json!({"batchItemFailures": []})
    );
}

/// The inspector function as Lambda drives it on both its triggers: a stream batch from its
/// change-monitor mapping (records read from moto's stream, in the shape Lambda delivers them)
/// is judged change by change, and a scheduled EventBridge event samples the cache. Each
/// writes its own metrics line: the batch's carries no `KeysChecked` (the schedule's heartbeat),
/// the scheduled run's none of the monitor's metrics.
#[tokio::test]
async fn inspector_function_judges_a_stream_batch_and_samples_on_its_schedule() {
    // Delete mode: a refresh-mode Redis holds an epoch key per hash slot, 16,384 keys among
    // which a sample of 3 products finds none.
    let mut env = TestEnv::new(Delete).await;
    for id in ["ins-fn-1", "ins-fn-2", "ins-fn-3"] {
        env.put_product(id, "10").await;
    }
    let event = env.drain_stream_returning().await;
    for id in ["ins-fn-1", "ins-fn-2", "ins-fn-3"] {
        let (status, _, _) = env.http_get(id).await;
        assert_eq!(status, 200);
    }
    env.raw_set(
        "product:ins-fn-2",
        &json!({"name": "Product ins-fn-2", "price": 7, "productId": "ins-fn-2"}).to_string(),
    )
    .await;
    let redis_url = env.redis.url();
    let mut function = Function::spawn(
        "inspector-function",
        &[
            ("REDIS_URL", &redis_url),
            ("TABLE_NAME", &env.table),
            ("INSPECT_GRACE_MS", "200"),
        ],
    )
    .await;

    let judged = function.respond(event).await;
    assert_eq!(
        (
            &judged["changes"],
            &judged["inconsistent"],
            &judged["pending"]
        ),
        (&json!(3), &json!(["product:ins-fn-2"]), &json!(0)),
        "{judged}"
    );
    let scheduled = json!({
        "version": "0",
        "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-12-03T12:00:00Z",
        "region": "eu-west-1",
        "resources": ["arn:aws:events:eu-west-1:123456789012:rule/inspector"],
        "detail": {}
    });
    let sampled = function.respond(scheduled).await;
    assert_eq!(
        (&sampled["checked"], &sampled["inconsistent"]),
        (&json!(3), &json!(["product:ins-fn-2"])),
        "{sampled}"
    );

    function.settled().await;
    let output = function.output().await;
    let lines: Vec<crate::metrics::Emf> = output
        .lines()
        .filter_map(crate::metrics::parse_emf)
        .collect();
    let with = |name: &str| {
        lines
            .iter()
            .filter(|e| e.names().any(|n| n == name))
            .count()
    };
    assert_eq!(
        (with("ChangesChecked"), with("KeysChecked")),
        (1, 1),
        "{output}"
    );
    assert!(
        lines
            .iter()
            .all(|e| !(e.names().any(|n| n == "ChangesChecked")
                && e.names().any(|n| n == "KeysChecked"))),
        "one line carries both paths' metrics:\n{output}"
    );
    assert_eq!(crate::metrics::total(&lines, "ChangesInconsistent"), 1.0);
    assert_eq!(crate::metrics::total(&lines, "InconsistentKeys"), 1.0);
}
