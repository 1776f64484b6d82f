//! The local stack: the read function's handler behind real HTTP and the invalidator fed by the
//! local event source mapping, in-process (`Stack::start`) and as the compiled `pcache dev`
//! command, which also owns and stops its redis-server and moto children.
//!
//! The command tests need the binary: `cargo build -p pcache` first (scripts/test.sh does).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use local_stack::services::RedisServer;
use local_stack::stack::{Stack, StackOptions, StackState};
use product_cache::config::CacheSettings;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::support::{init_logging, moto_endpoint, unique_table};

/// How long a price change may take to reach HTTP readers. The poller polls every 100 ms, so
/// this is generous on purpose: a busy CI machine runs the whole suite at once.
const CHANGE_VISIBLE_WITHIN: Duration = Duration::from_secs(5);
/// Start-up of the command includes importing moto and seeding 1,000 products.
const STARTS_WITHIN: Duration = Duration::from_secs(60);
const EXITS_WITHIN: Duration = Duration::from_secs(15);

/// (status, X-Cache, JSON body, content-type) of one HTTP request.
struct Answer {
    status: u16,
    x_cache: Option<String>,
    content_type: Option<String>,
    body: Value,
}

async fn request(method: &str, url: &str) -> Answer {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .body(Empty::new())
        .unwrap();
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (status, x_cache, content_type) = (
        resp.status().as_u16(),
        header("x-cache"),
        header("content-type"),
    );
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{url}: body is not JSON ({e}): {bytes:?}"));
    Answer {
        status,
        x_cache,
        content_type,
        body,
    }
}

async fn get(url: &str) -> Answer {
    request("GET", url).await
}

/// Reads `url` until its price is `price`; returns how long that took.
async fn until_price(url: &str, price: Value) -> Duration {
    let started = Instant::now();
    loop {
        let answer = get(url).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        if answer.body["price"] == price {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < CHANGE_VISIBLE_WITHIN,
            "{url} still answers {} after {CHANGE_VISIBLE_WITHIN:?}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stack on its own table of the shared moto server and its own Redis.
async fn start_stack(redis: &RedisServer, seed: usize, dir: &Path) -> Stack {
    Stack::start(stack_options(redis, seed, dir))
        .await
        .expect("the stack starts")
}

/// [`start_stack`]'s options, its metrics in `dir/metrics.jsonl`.
fn stack_options(redis: &RedisServer, seed: usize, dir: &Path) -> StackOptions {
    init_logging();
    let mut options = StackOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        table: unique_table("stack"),
        redis_url: Some(redis.url()),
        dynamodb_endpoint: Some(moto_endpoint().to_owned()),
        seed_products: seed,
        ..StackOptions::default()
    };
    options.esm.on_failure = Some(dir.join("on-failure.jsonl"));
    options.metrics = Some(dir.join("metrics.jsonl"));
    options
}

async fn dynamodb() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&local_stack::table::local_sdk_config(moto_endpoint()).await)
}

fn refuses(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[tokio::test]
async fn serves_the_read_path_over_http_and_a_table_change_reaches_it_through_the_stream() {
    let redis = RedisServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(&redis, local_stack::seed::DEFAULT_PRODUCTS, dir.path()).await;
    assert_eq!(stack.seeded(), 1000);
    let url = format!("{}/products/kb-001", stack.http_url());

    let first = get(&url).await;
    assert_eq!(
        (first.status, first.x_cache.as_deref()),
        (200, Some("miss")),
        "{}",
        first.body
    );
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.body["name"], "Mechanical keyboard");
    assert_eq!(first.body["price"], json!(129.99));
    assert_eq!(first.body["version"], json!(1));
    let second = get(&url).await;
    assert_eq!(
        (second.status, second.x_cache.as_deref()),
        (200, Some("hit"))
    );
    assert_eq!(second.body, first.body);

    // Any writer to the table; nothing tells the stack but the stream.
    dynamodb()
        .await
        .update_item()
        .table_name(stack.table())
        .key("productId", AttributeValue::S("kb-001".into()))
        .update_expression("SET price = :p ADD version :one")
        .expression_attribute_values(":p", AttributeValue::N("99.99".into()))
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .send()
        .await
        .unwrap();
    let took = until_price(&url, json!(99.99)).await;
    eprintln!("price change visible over HTTP after {took:?}");
    assert_eq!(get(&url).await.x_cache.as_deref(), Some("hit"));

    // API Gateway's own answer for what matches no route, without calling the function.
    // (`GET /products` is the batch route: see the batch test.)
    for (method, path) in [
        ("GET", "/nope"),
        ("GET", "/products/"),
        ("GET", "/products/kb-001/reviews"),
        ("POST", "/products/kb-001"),
    ] {
        let answer = request(method, &format!("{}{path}", stack.http_url())).await;
        assert_eq!(answer.status, 404, "{method} {path}");
        assert_eq!(
            answer.body,
            json!({"message": "Not Found"}),
            "{method} {path}"
        );
        assert_eq!(answer.x_cache, None, "{method} {path} reached the function");
    }
    // HEAD too: API Gateway matches the route's method exactly. (No body to parse.)
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let head = hyper::Request::head(&url).body(Empty::new()).unwrap();
    assert_eq!(client.request(head).await.unwrap().status(), 404);

    // The handler's own answers: a bad id (percent-decoded into the path parameter) and an
    // absent product.
    let bad = get(&format!("{}/products/%7Bbad%7D", stack.http_url())).await;
    assert_eq!((bad.status, bad.x_cache.as_deref()), (400, Some("bypass")));
    assert_eq!(bad.body["error"], "invalid_id", "{}", bad.body);
    let absent = get(&format!("{}/products/no-such-thing", stack.http_url())).await;
    assert_eq!(
        (absent.status, absent.x_cache.as_deref()),
        (404, Some("miss"))
    );
    assert_eq!(absent.body["error"], "not_found");
    let spaced = get(&format!("{}/products/a%20b", stack.http_url())).await;
    assert_eq!(
        spaced.status, 404,
        "an id with a space is valid, and absent"
    );

    let stats = stack.stats();
    assert!(stats.hits >= 2 && stats.misses >= 3, "{stats}");
    assert_eq!(stats.bypasses, 1, "{stats}");
    assert!(stats.invalidations > 1000, "seed and change: {stats}");
    assert_eq!(stats.records_given_up, 0, "{stats}");

    // The same story in the metrics file, as CloudWatch would read it from the functions.
    let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let emf: Vec<_> = lines
        .lines()
        .map(|l| crate::metrics::parse_emf(l).unwrap_or_else(|| panic!("not an EMF line: {l}")))
        .collect();
    let of = |function: &str| -> Vec<_> {
        emf.iter()
            .filter(|e| e.dimensions.contains(&("Function".into(), function.into())))
            .collect()
    };
    let read = crate::metrics::total(&of("read"), "Hits");
    assert_eq!(read, stats.hits as f64, "{lines}");
    assert_eq!(
        crate::metrics::total(&of("read"), "Misses"),
        stats.misses as f64
    );
    assert_eq!(crate::metrics::total(&of("read"), "InvalidRequests"), 1.0);
    assert!(
        crate::metrics::total(&of("invalidator"), "RecordsApplied") > 1000.0,
        "seed and change: {lines}"
    );

    let port = stack.http_addr().port();
    stack.shutdown().await;
    assert!(refuses(port), "the HTTP port still accepts after shutdown");
}

/// Waits until the invalidator has acknowledged `records` stream records since the stack started.
async fn until_invalidated(stack: &Stack, records: u64) {
    let started = Instant::now();
    while stack.stats().invalidations < records {
        assert!(
            started.elapsed() < CHANGE_VISIBLE_WITHIN,
            "{} of {records} records applied after {CHANGE_VISIBLE_WITHIN:?}",
            stack.stats().invalidations
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The change monitor runs as the stream's second reader: a price change made by another
/// writer, applied by the invalidator, then undone in the cache by a stale write (a fill that
/// lost its race) is reported in the metrics file a grace period after the change, and the
/// changes around it are not.
#[tokio::test]
async fn the_change_monitor_reports_a_stale_entry_left_after_a_change() {
    let redis = RedisServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut options = stack_options(&redis, 20, dir.path());
    // A short window: the test waits one grace period, not a production window too.
    options.change_monitor = Some(local_stack::poller::EsmConfig {
        batching_window: Duration::from_millis(500),
        ..local_stack::stack::change_monitor_esm()
    });
    let metrics = dir.path().join("metrics.jsonl");
    let stack = Stack::start(options).await.expect("the stack starts");
    let url = |id: &str| format!("{}/products/{id}", stack.http_url());
    let stale = get(&url("kb-001")).await.body.to_string();
    for (id, price) in [
        ("kb-001", "99.99"),
        ("kb-002", "19.99"),
        ("mouse-001", "9.99"),
    ] {
        dynamodb()
            .await
            .update_item()
            .table_name(stack.table())
            .key("productId", AttributeValue::S(id.into()))
            .update_expression("SET price = :p")
            .expression_attribute_values(":p", AttributeValue::N(price.into()))
            .send()
            .await
            .unwrap();
    }
    until_invalidated(&stack, 23).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("product:kb-001")
        .arg(&stale)
        .query_async(&mut conn)
        .await
        .unwrap();

    // The monitor's lines: three changes judged, one inconsistent.
    let started = Instant::now();
    let judged = || {
        let text = std::fs::read_to_string(&metrics).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let emf = crate::metrics::emf_of(&Mutex::new(lines));
        (
            crate::metrics::total(&emf, "ChangesChecked"),
            crate::metrics::total(&emf, "ChangesInconsistent"),
        )
    };
    while judged().0 < 3.0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the change monitor judged {:?} after a minute",
            judged()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(judged(), (3.0, 1.0));
    assert!(stack.stats().changes_monitored >= 3);
    stack.shutdown().await;
}

#[tokio::test]
async fn a_batch_over_http_answers_every_product_in_request_order() {
    let redis = RedisServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(&redis, 20, dir.path()).await;
    // An id holding a comma, written as any writer would. Its stream record is applied before
    // the batch reads it, so that its invalidation cannot remove the batch's fill afterwards.
    dynamodb()
        .await
        .put_item()
        .table_name(stack.table())
        .item("productId", AttributeValue::S("kb,002".into()))
        .item("name", AttributeValue::S("Keyboard, compact".into()))
        .item("price", AttributeValue::N("59.5".into()))
        .send()
        .await
        .unwrap();
    until_invalidated(&stack, stack.seeded() as u64 + 1).await;
    let base = format!("{}/products", stack.http_url());

    // The comma inside an id is sent as `%2C`; the repeated id collapses to its first place.
    let first = get(&format!("{base}?ids=kb-001,kb%2C002,no-such-thing,kb-001")).await;
    assert_eq!(
        (first.status, first.x_cache.as_deref()),
        (200, Some("hits=0 misses=3 bypasses=0")),
        "{}",
        first.body
    );
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    let products = first.body["products"].as_array().unwrap().clone();
    let ids: Vec<_> = products.iter().map(|p| p["id"].clone()).collect();
    assert_eq!(
        ids,
        [json!("kb-001"), json!("kb,002"), json!("no-such-thing")]
    );
    assert_eq!(products[0]["product"]["name"], "Mechanical keyboard");
    assert_eq!(products[0]["product"]["price"], json!(129.99));
    assert_eq!(products[1]["product"]["name"], "Keyboard, compact");
    assert_eq!(products[2], json!({"id": "no-such-thing", "product": null}));

    // The fills went to the keys single reads use: all hits now, either way, in the new order.
    let second = get(&format!("{base}?ids=no-such-thing,kb%2C002,kb-001")).await;
    assert_eq!(
        (second.status, second.x_cache.as_deref()),
        (200, Some("hits=3 misses=0 bypasses=0")),
        "{}",
        second.body
    );
    assert_eq!(
        second.body["products"],
        json!([products[2], products[1], products[0]])
    );
    let single = get(&format!("{base}/kb%2C002")).await;
    assert_eq!(
        (single.status, single.x_cache.as_deref()),
        (200, Some("hit"))
    );
    assert_eq!(single.body, products[1]["product"]);

    // A request that is not a batch is the handler's 400, not API Gateway's 404.
    for query in ["", "?ids=", "?ids=kb-001,%7Bbad%7D"] {
        let bad = get(&format!("{base}{query}")).await;
        assert_eq!(
            (bad.status, bad.x_cache.as_deref()),
            (400, Some("hits=0 misses=0 bypasses=0")),
            "{query}: {}",
            bad.body
        );
        assert_eq!(bad.body["error"], "invalid_ids", "{query}: {}", bad.body);
    }
    let post = request("POST", &format!("{base}?ids=kb-001")).await;
    assert_eq!(
        (post.status, post.x_cache),
        (404, None),
        "the route is GET only"
    );

    // The status line and the metrics count products, not requests.
    let stats = stack.stats();
    assert_eq!(
        (stats.requests, stats.hits, stats.misses, stats.bypasses),
        (6, 4, 3, 0),
        "{stats}"
    );
    let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let read: Vec<_> = lines
        .lines()
        .map(|l| crate::metrics::parse_emf(l).unwrap_or_else(|| panic!("not an EMF line: {l}")))
        .filter(|e| e.dimensions.contains(&("Function".into(), "read".into())))
        .collect();
    let total = |name| crate::metrics::total(&read, name);
    assert_eq!(
        (
            total("BatchReads"),
            total("BatchSize"),
            total("Hits"),
            total("Misses"),
            total("InvalidRequests")
        ),
        (2.0, 6.0, 4.0, 3.0, 3.0),
        "{lines}"
    );
    stack.shutdown().await;
}

#[tokio::test]
async fn warming_the_first_50_ids_makes_their_reads_hits() {
    let redis = RedisServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Enough products that the first 50 of a Scan are a part of the table, not all of it.
    let stack = start_stack(&redis, 200, dir.path()).await;
    let client = dynamodb().await;
    let ids = pcache::warm::first_ids(&client, stack.table(), "productId", 50)
        .await
        .unwrap();
    assert_eq!(ids.len(), 50);

    let settings = CacheSettings {
        redis_timeout: Duration::from_secs(1),
        ..CacheSettings::default()
    };
    let redis = product_cache::config::RedisSettings::new(stack.redis_url());
    let read = product_cache::config::ReadSettings::new(redis, stack.table(), settings);
    let sdk = local_stack::table::local_sdk_config(moto_endpoint()).await;
    let read = product_cache::read::ReadPath::build(read, &sdk)
        .await
        .unwrap();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let tick = || {
        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let summary = pcache::warm::warm(&read, ids.clone(), 16, tick).await;
    assert_eq!(
        (summary.filled, summary.already_cached, summary.errors),
        (50, 0, 0),
        "{summary}"
    );
    assert_eq!(done.load(std::sync::atomic::Ordering::Relaxed), 50);

    for id in &ids {
        let answer = get(&format!("{}/products/{id}", stack.http_url())).await;
        assert_eq!(
            (answer.status, answer.x_cache.as_deref()),
            (200, Some("hit")),
            "{id}: {}",
            answer.body
        );
        assert_eq!(answer.body["productId"], json!(id));
    }
    // Warming again leaves everything as it is.
    let again = pcache::warm::warm(&read, ids, 16, || {}).await;
    assert_eq!(again.already_cached, 50, "{again}");
    stack.shutdown().await;
}

/// The command with a clean environment for the stack: no Redis or DynamoDB of the caller's.
fn command(args: &[&str], cwd: &Path) -> Command {
    let mut cmd = Command::new(crate::support::binary("pcache"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("REDIS_URL")
        .env_remove("AWS_ENDPOINT_URL_DYNAMODB")
        .env_remove("INVALIDATION_MODE")
        .env_remove("REDIS_CACHE_TYPE")
        .env_remove("REDIS_CA_FILE")
        .env_remove("REDIS_IAM_USER")
        .env_remove("REDIS_IAM_CACHE_NAME")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Collects a pipe's lines, echoing them with `TEST_LOG`.
fn collect(pipe: impl AsyncRead + Unpin + Send + 'static, into: Arc<Mutex<String>>) {
    let echo = std::env::var_os("TEST_LOG").is_some();
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if echo {
                eprintln!("[pcache] {line}");
            }
            into.lock().unwrap().push_str(&format!("{line}\n"));
        }
    });
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

/// `pcache dev` (its default cache, one redis-server) serves a miss and a hit, a price change
/// made with the banner's `set-price` reaches a read through the stream, `warm` fills through
/// the state file, and SIGINT stops it cleanly with every child gone.
#[tokio::test]
async fn the_dev_command_serves_changes_prices_and_stops_its_children_on_sigint() {
    dev_command_round_trip(None).await;
}

/// The same with `--cache serverless`: the whole system runs on the local ElastiCache
/// Serverless stand-in (TLS, IAM, one virtual shard), the banner says so and names its
/// endpoints and the servers behind them, the functions' scripts ran on its primary, `warm`
/// reaches it with the variables the banner prints, and after SIGINT the endpoints and both
/// servers are gone too.
#[tokio::test]
async fn the_dev_command_runs_the_system_on_a_serverless_stand_in() {
    dev_command_round_trip(Some("serverless")).await;
}

/// Starts `pcache dev` (with `--cache <cache>` if given) and takes it through a miss, a hit, a
/// price change through the stream, a warm and a clean stop.
async fn dev_command_round_trip(cache: Option<&str>) {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let state_arg = state_dir.to_str().unwrap();
    // Run from an empty directory: no SAM template there, so the poller uses Lambda's defaults
    // (the repository's template is checked by esm_template's own test).
    let mut args = vec!["dev", "--listen", "127.0.0.1:0", "--state-dir", state_arg];
    if let Some(cache) = cache {
        args.extend(["--cache", cache]);
    }
    let Dev {
        mut stack,
        base,
        addr,
        banner,
        stderr,
    } = start_dev(command(&args, dir.path())).await;
    let serverless = cache.map(|_| ServerlessBanner::of(&banner));

    let state: StackState =
        serde_json::from_str(&std::fs::read_to_string(state_dir.join("state.json")).unwrap())
            .unwrap();
    assert_eq!(Some(state.pid), stack.id());
    assert_eq!(state.http, base);
    assert_eq!(state.table, "Products");
    if let Some(serverless) = &serverless {
        // The functions' Redis is the stand-in's primary endpoint.
        assert_eq!(state.redis_url, serverless.primary, "{banner}");
    }

    let url = format!("{base}/products/kb-001");
    let first = get(&url).await;
    assert_eq!(
        (first.status, first.x_cache.as_deref()),
        (200, Some("miss"))
    );
    assert_eq!(first.body["price"], json!(129.99));
    assert_eq!(get(&url).await.x_cache.as_deref(), Some("hit"));

    // The command the banner tells people to run, found through the state file.
    let set = command(
        &["set-price", "kb-001", "99.99", "--state-dir", state_arg],
        dir.path(),
    )
    .output()
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&set.stdout);
    assert!(
        set.status.success(),
        "set-price failed: {said}{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert_eq!(said.trim(), "kb-001: price 129.99 -> 99.99 (version 2)");
    let took = until_price(&url, json!(99.99)).await;
    eprintln!("set-price visible over HTTP after {took:?}");
    if let Some(serverless) = &serverless {
        // The read path's and the invalidator's scripts ran on the server behind the endpoint.
        assert!(
            crate::support::command_calls(serverless.backend, "evalsha").await > 0,
            "no script ran on the stand-in's primary:\n{banner}"
        );
    }

    let mut warm = command(
        &["warm", "--first", "20", "--state-dir", state_arg],
        dir.path(),
    );
    if let Some(serverless) = &serverless {
        warm.envs(serverless.env.iter().map(|(k, v)| (k, v)));
    }
    let warm = warm.output().await.unwrap();
    let said = String::from_utf8_lossy(&warm.stdout);
    assert!(warm.status.success(), "warm failed: {said}");
    assert!(
        said.contains("errors 0") && said.contains("filled 20"),
        "{said}"
    );

    // SAFETY: plain kill(2) on the child we spawned and have not reaped.
    let pid = stack.id().expect("still running") as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = tokio::time::timeout(EXITS_WITHIN, stack.wait())
        .await
        .unwrap_or_else(|_| panic!("still running after SIGINT:\n{}", stderr.lock().unwrap()))
        .unwrap();
    assert!(
        status.success(),
        "{status}; stderr:\n{}",
        stderr.lock().unwrap()
    );
    let mut children = vec![
        ("HTTP", addr.port()),
        ("redis-server", port_of(&state.redis_url)),
        ("moto_server", port_of(&state.dynamodb_endpoint)),
    ];
    if let Some(serverless) = &serverless {
        children.extend([
            ("the reader endpoint", port_of(&serverless.reader)),
            ("the stand-in's primary", serverless.backend),
            ("the stand-in's replica", serverless.replica),
        ]);
    }
    for (what, port) in children {
        assert!(refuses(port), "{what} on port {port} outlived the stack");
    }
    assert!(
        !state_dir.join("state.json").exists(),
        "the state file names a stack that is gone"
    );
    let gone = command(
        &["set-price", "kb-001", "1", "--state-dir", state_arg],
        dir.path(),
    )
    .output()
    .await
    .unwrap();
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no running stack"));
}

/// A `pcache dev` that has printed its banner.
struct Dev {
    stack: tokio::process::Child,
    /// `http://<addr>`.
    base: String,
    addr: SocketAddr,
    banner: String,
    /// Everything it wrote to stderr so far (still collected).
    stderr: Arc<Mutex<String>>,
}

/// Spawns `dev` (a `pcache dev` command) with both pipes read, and waits for its banner.
async fn start_dev(mut dev: Command) -> Dev {
    let mut stack = dev
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pcache dev");
    let stderr = Arc::new(Mutex::new(String::new()));
    collect(stack.stderr.take().unwrap(), stderr.clone());
    let mut stdout = BufReader::new(stack.stdout.take().unwrap()).lines();

    let started = Instant::now();
    let find_address = async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("listening on ") {
                return Some(url.to_owned());
            }
        }
        None
    };
    let base = match tokio::time::timeout(STARTS_WITHIN, find_address).await {
        Ok(Some(url)) => url,
        other => panic!(
            "no address printed ({other:?}); stderr:\n{}",
            stderr.lock().unwrap()
        ),
    };
    eprintln!("pcache dev up after {:?}", started.elapsed());
    let addr: SocketAddr = base.strip_prefix("http://").unwrap().parse().unwrap();
    assert_ne!(addr.port(), 0);
    // The rest of the banner, so the pipe never fills.
    // Read on from the same reader: its buffer may hold the rest of the banner already.
    let banner = Arc::new(Mutex::new(String::new()));
    let into = banner.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stdout.next_line().await {
            into.lock().unwrap().push_str(&format!("{line}\n"));
        }
    });
    // It is printed at once, after the address.
    let printed = async {
        while !banner.lock().unwrap().contains("Ctrl-C stops everything") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(STARTS_WITHIN, printed)
        .await
        .unwrap_or_else(|_| panic!("no banner: {}", banner.lock().unwrap()));
    let banner = banner.lock().unwrap().clone();
    Dev {
        stack,
        base,
        addr,
        banner,
        stderr,
    }
}

/// A template whose read function sets four variables, three by parameters' defaults.
const DEV_TEMPLATE: &str = r#"
Parameters:
  LeaseMs: {Type: Number, Default: 4000}
  RedisTimeoutMs: {Type: Number, Default: 100}
  NegativeTtlSeconds: {Type: Number, Default: 40}
Resources:
  ReadFunction:
    Type: AWS::Serverless::Function
    Properties:
      Environment:
        Variables:
          REDIS_URL: !Sub 'rediss://${Cache.Address}:6379'
          LEASE_MS: !Ref LeaseMs
          REDIS_TIMEOUT_MS: !Ref RedisTimeoutMs
          CACHE_TTL_SECONDS: 600
          NEGATIVE_TTL_SECONDS: !Ref NegativeTtlSeconds
"#;

/// `pcache dev` configures its functions as they are configured on Lambda: the environment
/// over the template's values over the defaults. The banner lists what differs from the
/// template, and both layers take effect (the template's CACHE_TTL_SECONDS on a cached item's
/// TTL; the environment's NEGATIVE_TTL_SECONDS over the template's on a "not found"'s; the
/// environment's METRICS_NAMESPACE, a variable it used to ignore, in the metrics lines). With
/// stderr a pipe its status line is written when a counter changed, soon after, and not again
/// while nothing happens.
#[tokio::test]
async fn the_dev_command_takes_the_functions_variables_and_writes_its_status_only_on_change() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("template.yaml"), DEV_TEMPLATE).unwrap();
    let state_dir = dir.path().join("state");
    let args = [
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--template",
        "template.yaml",
        "--no-change-monitor",
        // kb-001 among them; a small catalog keeps the start light next to the other dev tests.
        "--seed",
        "10",
    ];
    let mut dev = command(&args, dir.path());
    dev.envs([
        ("LEASE_MS", "5000"),
        ("REDIS_TIMEOUT_MS", "250"),
        ("NEGATIVE_TTL_SECONDS", "50"),
        ("METRICS_NAMESPACE", "DevSettings"),
        // Connection variables are the stack's own: this one must not reach the functions.
        ("REDIS_CLUSTER", "true"),
    ]);
    let Dev {
        mut stack,
        base,
        banner,
        stderr,
        ..
    } = start_dev(dev).await;
    for shown in [
        "differs from the template: LEASE_MS=5000 (template: 4000)",
        "differs from the template: REDIS_TIMEOUT_MS=250 (template: 100)",
        "differs from the template: NEGATIVE_TTL_SECONDS=50 (template: 40)",
        "differs from the template: METRICS_NAMESPACE=DevSettings (template: unset, default \
         ProductCache)",
        "the functions' variables from the environment, then template.yaml, then the defaults",
    ] {
        assert!(
            banner.contains(shown),
            "{shown:?} not in the banner:\n{banner}"
        );
    }
    assert!(!banner.contains("CACHE_TTL_SECONDS"), "{banner}");

    assert_eq!(get(&format!("{base}/products/kb-001")).await.status, 200);
    assert_eq!(
        get(&format!("{base}/products/no-such-product"))
            .await
            .status,
        404
    );
    let state: StackState =
        serde_json::from_str(&std::fs::read_to_string(state_dir.join("state.json")).unwrap())
            .unwrap();
    let redis = redis::Client::open(state.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl = |key: &str| {
        let (mut redis, key) = (redis.clone(), key.to_owned());
        async move {
            redis::cmd("TTL")
                .arg(key)
                .query_async::<i64>(&mut redis)
                .await
                .unwrap()
        }
    };
    // The fill lands after the answer: wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut item = ttl("product:kb-001").await;
    while item < 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        item = ttl("product:kb-001").await;
    }
    assert!(
        (1..=600).contains(&item),
        "TTL {item}: not the template's 600 s"
    );
    let not_found = ttl("product:no-such-product").await;
    assert!(
        (41..=50).contains(&not_found),
        "TTL {not_found}: not the environment's 50 s"
    );
    let metrics = std::fs::read_to_string(state_dir.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.contains("\"DevSettings\"") && !metrics.contains("\"ProductCache\""),
        "{metrics}"
    );

    // The status line after those two requests: written once a counter changed, within about
    // the second it is looked at (not at the next ten-second mark).
    let status_lines = || -> Vec<String> {
        stderr
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("hits "))
            .map(str::to_owned)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while !status_lines().iter().any(|l| l.contains("misses 2")) {
        assert!(
            Instant::now() < deadline,
            "no status line with both misses within 3 s:\n{}",
            stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Idle: nothing changes, so nothing more is written.
    let before = status_lines();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = status_lines();
    assert_eq!(after, before, "status lines written while idle");
    assert!(
        after.windows(2).all(|w| w[0] != w[1]),
        "the same status line twice in a row: {after:#?}"
    );

    // SAFETY: plain kill(2) on the child we spawned and have not reaped.
    let pid = stack.id().expect("still running") as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = tokio::time::timeout(EXITS_WITHIN, stack.wait())
        .await
        .expect("stops on SIGINT")
        .unwrap();
    assert!(status.success(), "{status}");
    // The last status is the one already shown: not written again at the stop.
    let last = status_lines();
    assert!(
        last.windows(2).all(|w| w[0] != w[1]),
        "the same status line twice in a row: {last:#?}"
    );
}

/// What `pcache dev --cache serverless` says about its stand-in in the banner.
struct ServerlessBanner {
    primary: String,
    reader: String,
    backend: u16,
    replica: u16,
    /// The variables other commands need to reach it (`KEY=value` on the banner's line).
    env: Vec<(String, String)>,
}

impl ServerlessBanner {
    fn of(banner: &str) -> Self {
        assert!(
            banner.contains("a local ElastiCache Serverless stand-in"),
            "the banner does not say it runs on the serverless stand-in:\n{banner}"
        );
        let after = |marker: &str| -> String {
            let at = banner
                .find(marker)
                .unwrap_or_else(|| panic!("{marker:?} not in the banner:\n{banner}"));
            banner[at + marker.len()..]
                .split(|c: char| c.is_whitespace() || c == ',')
                .next()
                .unwrap()
                .to_owned()
        };
        let port = |marker: &str| after(marker).trim_start_matches(':').parse().unwrap();
        let line = banner
            .lines()
            .find(|l| l.contains("other commands on it:"))
            .unwrap_or_else(|| panic!("no variables for other commands:\n{banner}"));
        let env = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect::<Vec<_>>();
        let primary = after("primary endpoint ");
        assert!(primary.starts_with("rediss://"), "{banner}");
        Self {
            reader: after("reader endpoint "),
            backend: port("over redis-server "),
            replica: port("(primary) and "),
            primary,
            env,
        }
    }
}
