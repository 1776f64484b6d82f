//! The read path against a real Redis and the local DynamoDB.

use std::time::Duration;

use product_cache::config::{
    CacheSettings,
    InvalidationMode::{Delete, Refresh},
};
use product_cache::read::ReadPath;
use serde_json::{json, Value};

use crate::support::{fixture, fresh, http_get, redis_cache, respond, TestEnv};

#[tokio::test]
async fn a_miss_fills_the_cache_and_the_next_read_hits() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;

    let (code, x_cache, body) = env.http_get("kb-001").await;
    assert_eq!((code, x_cache.as_str()), (200, "miss"));
    assert_eq!(
        body,
        json!({"name": "Product kb-001", "price": 129.99, "productId": "kb-001"})
    );
    let cached = env.raw_get("product:kb-001").await.unwrap();
    assert_eq!(
        cached,
        r#"{"name":"Product kb-001","price":129.99,"productId":"kb-001"}"#
    );
    let ttl = env.ttl("product:kb-001").await;
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");

    let (code, x_cache, hit_body) = env.http_get("kb-001").await;
    assert_eq!((code, x_cache.as_str()), (200, "hit"));
    assert_eq!(hit_body, body);
    assert_eq!(
        env.read.store().count(),
        1,
        "the hit must not read the table"
    );
}

#[tokio::test]
async fn a_hit_is_served_from_redis_alone() {
    let env = TestEnv::new(Delete).await;
    // Nothing in the table: only Redis can answer this.
    env.raw_set("product:ghost", r#"{"productId":"ghost","price":1}"#)
        .await;
    let (code, x_cache, body) = env.http_get("ghost").await;
    assert_eq!(
        (code, x_cache.as_str(), &body["price"]),
        (200, "hit", &json!(1))
    );
    assert_eq!(env.read.store().count(), 0);
}

#[tokio::test]
async fn not_found_is_cached_briefly_and_cleared_by_an_insert() {
    for mode in [Delete, Refresh] {
        let mut env = TestEnv::new(mode).await;
        let (code, x_cache, body) = env.http_get("kb-new").await;
        assert_eq!((code, x_cache.as_str()), (404, "miss"));
        assert_eq!(body["error"], "not_found");
        assert_eq!(env.raw_get("product:kb-new").await.as_deref(), Some("null"));
        let ttl = env.ttl("product:kb-new").await;
        assert!((1..=30).contains(&ttl), "negative ttl {ttl}");

        let (code, x_cache, _) = env.http_get("kb-new").await;
        assert_eq!((code, x_cache.as_str()), (404, "hit"));
        assert_eq!(env.read.store().count(), 1);

        env.put_product("kb-new", "10").await;
        assert_eq!(env.drain_stream().await, 1);
        let (code, x_cache, body) = env.http_get("kb-new").await;
        assert_eq!(
            code, 200,
            "{mode:?}: the negative entry survived the INSERT"
        );
        assert_eq!(body["price"], json!(10));
        // Refresh mode wrote the new item in; delete mode left the fill to this read.
        let expected = if mode == Refresh { "hit" } else { "miss" };
        assert_eq!(x_cache, expected);
    }
}

#[tokio::test]
async fn redis_stopped_mid_test_bypasses_to_the_table_and_recovers() {
    let mut env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    assert_eq!(env.http_get("kb-001").await.1, "miss");
    assert_eq!(env.http_get("kb-001").await.1, "hit");

    env.redis.stop().await;
    for _ in 0..3 {
        let (code, x_cache, body) = env.http_get("kb-001").await;
        assert_eq!(
            (code, x_cache.as_str(), &body["price"]),
            (200, "bypass", &json!(129.99))
        );
    }
    let (code, x_cache, _) = env.http_get("missing").await;
    assert_eq!((code, x_cache.as_str()), (404, "bypass"));
    assert_eq!(env.read.store().count(), 5);

    // A restarted (empty) Redis is used again without restarting the function.
    env.redis.restart().await.unwrap();
    let mut x_cache = String::new();
    for _ in 0..50 {
        x_cache = env.http_get("kb-001").await.1;
        if x_cache != "bypass" {
            break;
        }
        // The connection manager reconnects in the background after a failure.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(x_cache, "miss");
    assert_eq!(env.http_get("kb-001").await.1, "hit");
}

#[tokio::test]
async fn a_redis_that_never_answers_costs_one_timeout_not_an_error() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    // A server that accepts connections and never replies: the slowest Redis there is.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let settings = CacheSettings {
        redis_timeout: Duration::from_millis(50),
        ..CacheSettings::default()
    };
    let read = ReadPath::new(
        redis_cache(&format!("redis://127.0.0.1:{port}"), &settings).await,
        env.store(&settings),
        settings,
    );
    let started = std::time::Instant::now();
    let (code, x_cache, body) = http_get(&read, "/products/kb-001").await;
    assert_eq!(
        (code, x_cache.as_str(), &body["price"]),
        (200, "bypass", &json!(129.99))
    );
    // Not a timing assertion on speed: a hung request would never get here at all. This bounds
    // it far above the 50 ms budget only to catch a timeout that is not applied.
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn dynamodb_failing_is_a_503_with_a_json_body_and_no_internals() {
    let env = TestEnv::new(Delete).await;
    let settings = CacheSettings::default();
    let read = ReadPath::new(
        env.cache(&settings).await,
        env.store_of("no-such-table", &settings),
        settings,
    );
    let (code, x_cache, body) = http_get(&read, "/products/kb-001").await;
    assert_eq!((code, x_cache.as_str()), (503, "miss"));
    assert_eq!(body["error"], "unavailable");
    let text = body.to_string();
    for leak in ["no-such-table", "ResourceNotFound", "dynamodb", "127.0.0.1"] {
        assert!(!text.contains(leak), "{leak} leaked into {text}");
    }
    // A failure is not cached as "not found".
    assert_eq!(env.raw_get("product:kb-001").await, None);
}

#[tokio::test]
async fn bad_ids_are_400_before_any_backend_call() {
    let env = TestEnv::new(Delete).await;
    let long = "x".repeat(2049);
    for path in [
        "/products/".to_owned(),
        format!("/products/{long}"),
        "/products/kb%0A001".to_owned(),
        "/products/%7Bkb%7D".to_owned(),
        "/products/kb%7D".to_owned(),
    ] {
        let (code, x_cache, body) = http_get(&env.read, &path).await;
        assert_eq!((code, x_cache.as_str()), (400, "bypass"), "{path}");
        assert_eq!(body["error"], "invalid_id");
        assert!(body["message"].as_str().unwrap().contains("product id"));
    }
    assert_eq!(env.read.cache().count(), 0, "Redis was called");
    assert_eq!(env.read.store().count(), 0, "DynamoDB was called");
}

#[tokio::test]
async fn an_api_gateway_v2_event_is_routed_by_its_path_parameter() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    let event = fixture("apigw-get-product.json").to_string();
    let req = lambda_http::request::from_str(&event).expect("a v2 event");
    let (code, x_cache, body) = respond(&env.read, req).await;
    assert_eq!(
        (code, x_cache.as_str(), &body["productId"]),
        (200, "miss", &json!("kb-001"))
    );

    // The id comes from pathParameters, not from the raw path.
    let mut odd: Value = fixture("apigw-get-product.json");
    odd["pathParameters"]["id"] = json!("{bad}");
    let req = lambda_http::request::from_str(&odd.to_string()).unwrap();
    assert_eq!(respond(&env.read, req).await.0, 400);
}

#[tokio::test]
async fn number_keyed_tables_are_read_by_number() {
    let env = TestEnv::with_settings(Delete, crate::support::key_type_n()).await;
    env.put_json(json!({"productId": {"N": "42"}, "price": {"N": "5"}}))
        .await;
    let (code, _, body) = env.http_get("42").await;
    assert_eq!((code, &body["productId"]), (200, &json!(42)));
    assert_eq!(
        env.raw_get("product:42").await.unwrap(),
        r#"{"price":5,"productId":42}"#
    );
    // A spelling DynamoDB would normalise is refused rather than cached under a key the stream
    // never invalidates.
    assert_eq!(env.http_get("042").await.0, 400);
}

#[tokio::test]
async fn both_paths_write_the_same_bytes_for_a_rich_item() {
    let mut env = TestEnv::new(Refresh).await;
    env.put_json(fixture("rich-item.json")).await;

    // Path 1: the read path's fill.
    assert_eq!(env.http_get("rich-001").await.1, "miss");
    let filled = env.raw_get("product:rich-001").await.unwrap();

    // Path 2: the invalidator's refresh, from the table's real stream record.
    env.raw_set("product:rich-001", "stale").await;
    assert_eq!(env.drain_stream().await, 1);
    let refreshed = env.raw_get("product:rich-001").await.unwrap();
    assert_eq!(filled, refreshed);

    // Path 2 again, from the hand-written Lambda fixture of the same item. Its sequence number
    // is older than the real stream's, so start from an empty Redis.
    env.flush().await;
    env.invalidator
        .handle(fresh(fixture("rich-item-insert.json")))
        .await;
    assert_eq!(env.raw_get("product:rich-001").await.unwrap(), filled);

    // What a foreign reader gets from JSON.parse: exact digits, sets as arrays, base64 binary.
    assert!(
        filled.contains("12345678901234567890123456789012345678"),
        "{filled}"
    );
    assert!(filled.contains("129.99"));
    assert!(filled.contains(r#""tinyNegative":-0.000001"#), "{filled}");
    let doc: Value = serde_json::from_str(&filled).unwrap();
    assert_eq!(doc["tags"], json!(["mechanical", "rgb", "unicode-é"]));
    assert_eq!(doc["ratings"], json!([1, 2.5, 10]));
    assert_eq!(doc["thumbnail"], json!("aGVsbG8="));
    assert_eq!(doc["blobs"], json!(["aGVsbG8=", "d29ybGQ="]));
    assert_eq!(doc["notes"], Value::Null);
    assert_eq!(doc["mixed"][7], json!(["x", "y"]));
    assert_eq!(doc["specs"]["layout"]["keyCount"], json!(87));
    assert!(doc["description"]
        .as_str()
        .unwrap()
        .contains("\\ at the end"));
}
