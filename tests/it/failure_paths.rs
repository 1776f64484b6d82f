//! The failure paths a production incident finds first: a reader that took a lease and then
//! cannot fill, and what the next reader of the key pays for it.

use std::sync::atomic::{AtomicUsize, Ordering};

use product_cache::config::{CacheSettings, InvalidationMode::*};
use product_cache::id::ProductId;
use product_cache::read::{CacheStatus, ReadError, ReadPath};
use product_cache::store::{DynamoStore, Item, ProductStore, StoreError};
use serde_json::json;

use crate::support::TestEnv;

/// The table through the real store, except that the reads it is told to fail, fail (a
/// DynamoDB brownout), and that it can answer with an older item than the table holds (what an
/// eventually consistent read, or a replica lagging, returns).
struct Faulty {
    inner: DynamoStore,
    fail_first: AtomicUsize,
    stale: Option<Item>,
}

impl ProductStore for Faulty {
    async fn get(&self, id: &ProductId) -> Result<Option<Item>, StoreError> {
        let failing = self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(StoreError("injected: the table is browning out".into()));
        }
        match &self.stale {
            Some(item) => Ok(Some(item.clone())),
            None => self.inner.get(id).await,
        }
    }
}

fn lease_of(id: &str) -> String {
    format!("{{product:{id}}}:lease")
}

#[tokio::test]
async fn a_failed_table_read_hands_its_lease_back() {
    let env = TestEnv::new(Delete).await;
    env.put_product("kb-001", "129.99").await;
    // A lease far longer than the test, so only handing it back can free it.
    let settings = CacheSettings {
        lease: std::time::Duration::from_secs(60),
        lease_wait: std::time::Duration::from_millis(300),
        ..CacheSettings::default()
    };
    let store = Faulty {
        inner: env.store(&settings),
        fail_first: AtomicUsize::new(1),
        stale: None,
    };
    let read = ReadPath::new(env.cache(&settings).await, store, settings);
    let (status, result) = read.get("kb-001").await;
    assert_eq!(status, CacheStatus::Miss);
    assert!(matches!(result, Err(ReadError::Store(_))));
    assert_eq!(
        env.raw_get(&lease_of("kb-001")).await,
        None,
        "the lease was kept"
    );
    // The table is back: the next reader takes the lease at once and fills. Had the lease been
    // kept, it would have waited, answered from the table without filling, and left no entry.
    let (status, result) = read.get("kb-001").await;
    assert_eq!(status, CacheStatus::Miss);
    assert!(result.is_ok());
    let cached = env.raw_get("product:kb-001").await.expect("filled");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&cached).unwrap()["price"],
        json!(129.99)
    );
}

#[tokio::test]
async fn a_fill_refused_as_older_hands_its_lease_back() {
    let settings = CacheSettings {
        version_attribute: Some("version".into()),
        lease: std::time::Duration::from_secs(60),
        ..CacheSettings::default()
    };
    let mut env = TestEnv::with_settings(Refresh, settings.clone()).await;
    let put = |version: &'static str, price: &'static str| {
        env.put_json(json!({
            "productId": {"S": "kb-001"}, "version": {"N": version}, "price": {"N": price}
        }))
    };
    put("1", "129.99").await;
    let stale: Item = serde_json::from_value(json!({
        "productId": {"S": "kb-001"}, "version": {"N": "1"}, "price": {"N": "129.99"}
    }))
    .unwrap();
    put("2", "99.99").await;
    env.drain_stream().await;
    // Version 2 is cached and then evicted; only `{key}:ver` remembers it.
    env.raw_del("product:kb-001").await;
    let store = Faulty {
        inner: env.store(&settings),
        fail_first: AtomicUsize::new(0),
        stale: Some(stale),
    };
    let read = ReadPath::new(env.cache(&settings).await, store, settings);
    assert_eq!(read.get("kb-001").await.0, CacheStatus::Miss);
    assert_eq!(
        env.raw_get("product:kb-001").await,
        None,
        "an older version was filled"
    );
    assert_eq!(
        env.raw_get(&lease_of("kb-001")).await,
        None,
        "the lease was kept"
    );
}
