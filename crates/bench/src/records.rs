//! Stream records as Lambda delivers them (the shape of `tests/fixtures`), made up in memory for
//! the batch figures: the invalidator only ever sees this JSON, and a table write per record
//! would measure moto instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

const STREAM_ARN: &str =
    "arn:aws:dynamodb:us-east-1:123456789012:table/Products/stream/2026-11-01T00:00:00.000";

/// Sequence numbers increase over the whole run, so a batch is never an (ignored) replay of an
/// earlier one, whatever Redis remembers.
pub fn next_sequence_number() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    // 21 digits, like DynamoDB's.
    format!("5{:020}", NEXT.fetch_add(1, Ordering::Relaxed))
}

pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// The item of product `id` in DynamoDB JSON, with a `description` of `padding` bytes.
pub fn image(id: &str, price: &str, version: u64, padding: usize) -> Value {
    let mut item = json!({
        "productId": {"S": id},
        "name": {"S": format!("Product {id}")},
        "category": {"S": "keyboards"},
        "price": {"N": price},
        "stock": {"N": "42"},
        "tags": {"SS": ["keyboards", "sale"]},
        "version": {"N": version.to_string()},
    });
    if padding > 0 {
        // Deterministic filler text, so the sizes (and the bytes) are the same on every run.
        let words = [
            "switch",
            "keycap",
            "tactile",
            "linear",
            "aluminium",
            "hot-swap",
        ];
        let mut text = String::with_capacity(padding + 16);
        let mut i = 0;
        while text.len() < padding {
            text.push_str(words[i % words.len()]);
            text.push(' ');
            i += 1;
        }
        text.truncate(padding);
        item["description"] = json!({"S": text});
    }
    item
}

/// One record. `view` is the stream view type; images not in it are left out.
pub fn record(
    event_name: &str,
    id: &str,
    new_image: Option<Value>,
    old_image: Option<Value>,
    view: &str,
) -> Value {
    let sequence_number = next_sequence_number();
    let mut change = json!({
        "ApproximateCreationDateTime": now_secs(),
        "Keys": {"productId": {"S": id}},
        "SequenceNumber": sequence_number,
        "SizeBytes": 0,
        "StreamViewType": view,
    });
    let mut size = 0;
    if let Some(image) = new_image {
        size += image.to_string().len();
        change["NewImage"] = image;
    }
    if let Some(image) = old_image {
        size += image.to_string().len();
        change["OldImage"] = image;
    }
    change["SizeBytes"] = json!(size);
    json!({
        "eventID": format!("{:032x}", fastrand::u128(..)),
        "eventName": event_name,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": change,
        "eventSourceARN": STREAM_ARN,
    })
}

pub fn event(records: Vec<Value>) -> Value {
    json!({ "Records": records })
}

/// `records` changes over `keys` products (two per key when `records == 2 * keys`): each key's
/// first change is an INSERT or a MODIFY, its second a MODIFY or a REMOVE, the keys' changes
/// interleaved at random (in order per key, as the stream keeps them). Seeded: the same batch
/// every run.
pub fn mixed_batch(records: usize, keys: usize, seed: u64) -> (Vec<String>, Value) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let ids: Vec<String> = (0..keys).map(|i| format!("bench-{i:06}")).collect();
    // Each key gets records / keys changes (the rest spread over the first keys).
    let mut changes: Vec<usize> = (0..records).map(|i| i % keys).collect();
    rng.shuffle(&mut changes);
    let mut seen = vec![0u32; keys];
    let mut out = Vec::with_capacity(records);
    for k in changes {
        let id = &ids[k];
        let n = seen[k];
        seen[k] += 1;
        let version = u64::from(n) + 1;
        let new = image(id, &format!("{}.99", 10 + version), version, 0);
        let old = image(
            id,
            &format!("{}.99", 9 + version),
            version.saturating_sub(1),
            0,
        );
        let record = match (n, rng.u8(0..10)) {
            (0, 0..=4) => record("INSERT", id, Some(new), None, "NEW_AND_OLD_IMAGES"),
            (0, _) => record("MODIFY", id, Some(new), Some(old), "NEW_AND_OLD_IMAGES"),
            (_, 0..=6) => record("MODIFY", id, Some(new), Some(old), "NEW_AND_OLD_IMAGES"),
            (_, _) => record("REMOVE", id, None, Some(old), "NEW_AND_OLD_IMAGES"),
        };
        out.push(record);
    }
    (ids, event(out))
}

/// Counts of each event name in an event, for the notes.
pub fn event_names(event: &Value) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for r in event["Records"].as_array().into_iter().flatten() {
        *counts
            .entry(r["eventName"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The item of a DynamoDB JSON image, as the product's document mapping takes it.
pub fn item_of(image: &Value) -> product_cache::store::Item {
    serde_json::from_value::<serde_dynamo::Item>(image.clone())
        .expect("images built here are valid DynamoDB JSON")
        .into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mixed_batch_keeps_each_keys_changes_in_order() {
        let (ids, event) = mixed_batch(1000, 500, 7);
        let records = event["Records"].as_array().unwrap();
        assert_eq!((ids.len(), records.len()), (500, 1000));
        let mut last: std::collections::HashMap<&str, u128> = Default::default();
        for r in records {
            let id = r["dynamodb"]["Keys"]["productId"]["S"].as_str().unwrap();
            let seq: u128 = r["dynamodb"]["SequenceNumber"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(last.insert(id, seq).is_none_or(|prev| prev < seq));
        }
        let names = event_names(&event);
        for name in ["INSERT", "MODIFY", "REMOVE"] {
            assert!(names.contains(name), "{names}");
        }
    }

    #[test]
    fn padded_images_have_the_asked_size_and_map_to_documents() {
        let image = image("bench-1", "10.99", 3, 5000);
        assert_eq!(image["description"]["S"].as_str().unwrap().len(), 5000);
        let doc = product_cache::document::Document::from_item(&item_of(&image)).unwrap();
        assert!(doc.as_str().len() > 5000);
        assert!(doc.as_str().contains("\"version\":3"));
    }
}
