//! Table write → the table's real stream → the invalidator → the read path.

use std::collections::BTreeSet;

use aws_lambda_events::dynamodb::Event;
use product_cache::config::InvalidationMode::{Delete, Refresh};
use serde_json::{json, Value};

use crate::support::{fixture, TestEnv};

async fn update_price(env: &TestEnv, id: &str, price: &str) {
    env.dynamodb
        .update_item()
        .table_name(&env.table)
        .key(
            "productId",
            aws_sdk_dynamodb::types::AttributeValue::S(id.into()),
        )
        .update_expression("SET price = :p")
        .expression_attribute_values(
            ":p",
            aws_sdk_dynamodb::types::AttributeValue::N(price.into()),
        )
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_price_change_reaches_readers_through_the_stream() {
    for mode in [Delete, Refresh] {
        let mut env = TestEnv::new(mode).await;
        env.put_product("kb-001", "129.99").await;
        env.drain_stream().await;
        assert_eq!(env.http_get("kb-001").await.2["price"], json!(129.99));
        assert_eq!(env.http_get("kb-001").await.1, "hit");

        update_price(&env, "kb-001", "99.99").await;
        // Before the stream is applied the cache still holds the old price: this is what the
        // invalidator exists to fix.
        assert_eq!(env.http_get("kb-001").await.2["price"], json!(129.99));
        assert_eq!(env.drain_stream().await, 1);
        let (code, x_cache, body) = env.http_get("kb-001").await;
        assert_eq!((code, &body["price"]), (200, &json!(99.99)), "{mode:?}");
        assert_eq!(x_cache, if mode == Refresh { "hit" } else { "miss" });

        env.delete_product("kb-001").await;
        assert_eq!(env.drain_stream().await, 1);
        assert_eq!(env.http_get("kb-001").await.0, 404, "{mode:?}");
    }
}

fn keys_of(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[tokio::test]
async fn stream_records_have_the_shape_of_the_fixtures() {
    let mut env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    update_price(&env, "kb-001", "99.99").await;
    env.delete_product("kb-001").await;
    let event = env.new_stream_event().await;

    // The strict library type accepts what the stream produced.
    let parsed: Event = serde_json::from_value(event.clone()).expect("a Lambda DynamoDB event");
    let names: Vec<_> = parsed
        .records
        .iter()
        .map(|r| r.event_name.as_str())
        .collect();
    assert_eq!(names, ["INSERT", "MODIFY", "REMOVE"]);

    // Every field the hand-written fixtures carry is present in the real record, and vice versa.
    for (record, fixture_name) in event["Records"].as_array().unwrap().iter().zip([
        "insert.json",
        "modify.json",
        "remove.json",
    ]) {
        let expected = &fixture(fixture_name)["Records"][0];
        assert_eq!(keys_of(record), keys_of(expected), "{fixture_name}");
        assert_eq!(
            keys_of(&record["dynamodb"]),
            keys_of(&expected["dynamodb"]),
            "{fixture_name}"
        );
        assert_eq!(record["eventSource"], "aws:dynamodb");
        assert_eq!(
            record["dynamodb"]["Keys"],
            json!({"productId": {"S": "kb-001"}})
        );
        assert!(record["dynamodb"]["ApproximateCreationDateTime"].is_number());
        assert!(record["eventSourceARN"]
            .as_str()
            .unwrap()
            .contains(&env.table));
    }
    assert_eq!(
        event["Records"][1]["dynamodb"]["NewImage"]["price"],
        json!({"N": "99.99"})
    );
}
