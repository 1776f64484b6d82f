//! The table: one `GetItem` per cache miss.

use std::collections::HashMap;
use std::future::Future;

use aws_sdk_dynamodb::types::AttributeValue as SdkValue;
use serde_dynamo::AttributeValue;

use crate::id::{KeyType, ProductId};

/// An item as the rest of the crate sees it, whichever client read it.
pub type Item = HashMap<String, AttributeValue>;

/// DynamoDB failed or could not be reached. Never the caller's fault: the read path answers 503.
#[derive(Debug, thiserror::Error)]
#[error("reading the table failed")]
pub struct StoreError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// Reads one product. A trait so unit tests can use a map and integration tests can count reads.
pub trait ProductStore: Send + Sync {
    fn get(&self, id: &ProductId) -> impl Future<Output = Result<Option<Item>, StoreError>> + Send;
}

/// The table through the AWS SDK. The client honours the standard variables
/// (`AWS_ENDPOINT_URL_DYNAMODB`, `AWS_REGION`, credentials), which is how tests and the local
/// stack point it at a local DynamoDB.
#[derive(Clone)]
pub struct DynamoStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    key_attribute: String,
    key_type: KeyType,
    consistent_read: bool,
}

impl DynamoStore {
    /// Positional, so only [`DynamoStore::from_settings`] calls it.
    pub(crate) fn new(
        client: aws_sdk_dynamodb::Client,
        table: impl Into<String>,
        key_attribute: impl Into<String>,
        key_type: KeyType,
        consistent_read: bool,
    ) -> Self {
        Self {
            client,
            table: table.into(),
            key_attribute: key_attribute.into(),
            key_type,
            consistent_read,
        }
    }
}

impl ProductStore for DynamoStore {
    async fn get(&self, id: &ProductId) -> Result<Option<Item>, StoreError> {
        let key = match self.key_type {
            KeyType::S => SdkValue::S(id.as_str().to_owned()),
            KeyType::N => SdkValue::N(id.as_str().to_owned()),
        };
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(&self.key_attribute, key)
            .consistent_read(self.consistent_read)
            .send()
            .await
            .map_err(|e| StoreError(Box::new(e)))?;
        Ok(out
            .item
            .map(|item| serde_dynamo::Item::from(item).into_inner()))
    }
}

/// A map-backed store for unit tests (feature `test-support`).
#[cfg(any(test, feature = "test-support"))]
pub mod memory {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct MemoryStore {
        pub items: Mutex<HashMap<String, Item>>,
        pub reads: AtomicUsize,
        pub fail: AtomicBool,
    }

    impl ProductStore for MemoryStore {
        async fn get(&self, id: &ProductId) -> Result<Option<Item>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError("injected failure".into()));
            }
            Ok(self.items.lock().unwrap().get(id.as_str()).cloned())
        }
    }
}
