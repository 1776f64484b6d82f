//! The table: one `GetItem` per cache miss, one `BatchGetItem` per batch request's misses.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue as SdkValue;
use serde_dynamo::AttributeValue;

use crate::id::{KeyType, ProductId};

/// An item as the rest of the crate sees it, whichever client read it.
pub type Item = HashMap<String, AttributeValue>;

/// DynamoDB failed or could not be reached. Never the caller's fault: the read path answers 503.
#[derive(Debug, thiserror::Error)]
#[error("reading the table failed")]
pub struct StoreError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

impl StoreError {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into().into())
    }
}

/// `e`'s message followed by its sources', as one line.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// What a batch read found, per id in the order asked: the item, `None` for one the table does
/// not have, or why this id could not be read (the others may have been).
pub type ManyItems = Vec<Result<Option<Item>, StoreError>>;

/// Reads products. A trait so unit tests can use a map and integration tests can count reads.
pub trait ProductStore: Send + Sync {
    fn get(&self, id: &ProductId) -> impl Future<Output = Result<Option<Item>, StoreError>> + Send;

    /// Many products at once (distinct ids; a batch request carries at most 100). This default reads them one by one, all in
    /// flight together: for wrappers and test stores; the table overrides it with one
    /// `BatchGetItem`.
    fn get_many(&self, ids: &[ProductId]) -> impl Future<Output = ManyItems> + Send {
        futures::future::join_all(ids.iter().map(|id| self.get(id)))
    }
}

/// How many times a batch read asks again for the keys DynamoDB left unprocessed (throttling,
/// or a reply past its 16 MB), and the pause before the first retry, doubled each time: at
/// most 10 + 20 + 40 + 80 ms of pauses, then the keys still unread are answered as errors.
const UNPROCESSED_RETRIES: u32 = 4;
const UNPROCESSED_BACKOFF: Duration = Duration::from_millis(10);

/// The most keys DynamoDB takes in one `BatchGetItem`.
const BATCH_GET_KEYS: usize = 100;

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

impl DynamoStore {
    fn key_value(&self, id: &ProductId) -> SdkValue {
        match self.key_type {
            KeyType::S => SdkValue::S(id.as_str().to_owned()),
            KeyType::N => SdkValue::N(id.as_str().to_owned()),
        }
    }

    /// The id an item read back carries: its key attribute, as the table stores it (a number
    /// key in canonical form, which is what [`ProductId`] requires of the ids asked for).
    fn id_of(&self, item: &HashMap<String, SdkValue>) -> Option<String> {
        match item.get(&self.key_attribute)? {
            SdkValue::S(s) | SdkValue::N(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// One `BatchGetItem` for `ids` (at most 100, distinct), the keys left unprocessed asked
    /// again with backoff. Returns the items found by id, and the ids still unread (the keys
    /// DynamoDB hands back are the ones sent).
    async fn batch_get(
        &self,
        ids: &[ProductId],
    ) -> Result<(HashMap<String, Item>, Vec<String>), StoreError> {
        use aws_sdk_dynamodb::types::KeysAndAttributes;
        let mut keys: Vec<HashMap<String, SdkValue>> = ids
            .iter()
            .map(|id| HashMap::from([(self.key_attribute.clone(), self.key_value(id))]))
            .collect();
        let mut found = HashMap::with_capacity(ids.len());
        let mut pause = UNPROCESSED_BACKOFF;
        for attempt in 0..=UNPROCESSED_RETRIES {
            if attempt > 0 {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            let request = KeysAndAttributes::builder()
                .set_keys(Some(std::mem::take(&mut keys)))
                .consistent_read(self.consistent_read)
                .build()
                .map_err(|e| StoreError(Box::new(e)))?;
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.table, request)
                .send()
                .await
                .map_err(|e| StoreError(Box::new(e)))?;
            for item in out
                .responses
                .and_then(|mut r| r.remove(&self.table))
                .unwrap_or_default()
            {
                if let Some(id) = self.id_of(&item) {
                    found.insert(id, serde_dynamo::Item::from(item).into_inner());
                }
            }
            keys = out
                .unprocessed_keys
                .and_then(|mut u| u.remove(&self.table))
                .map(|k| k.keys)
                .unwrap_or_default();
            if keys.is_empty() {
                break;
            }
        }
        let unread = keys.iter().filter_map(|k| self.id_of(k)).collect();
        Ok((found, unread))
    }
}

impl ProductStore for DynamoStore {
    async fn get(&self, id: &ProductId) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(&self.key_attribute, self.key_value(id))
            .consistent_read(self.consistent_read)
            .send()
            .await
            .map_err(|e| StoreError(Box::new(e)))?;
        Ok(out
            .item
            .map(|item| serde_dynamo::Item::from(item).into_inner()))
    }

    /// One `BatchGetItem` per [`BATCH_GET_KEYS`] ids (a batch request has at most 100), honouring
    /// `CONSISTENT_READ`. Keys DynamoDB leaves unprocessed are asked again a few times with
    /// backoff; those still unread are each answered as an error, the rest from what came back.
    async fn get_many(&self, ids: &[ProductId]) -> ManyItems {
        let mut answers = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH_GET_KEYS) {
            match self.batch_get(chunk).await {
                Ok((mut found, unread)) => {
                    if !unread.is_empty() {
                        tracing::warn!(
                            unread = unread.len(),
                            "BatchGetItem left keys unprocessed after {UNPROCESSED_RETRIES} retries"
                        );
                    }
                    for id in chunk {
                        // Not returned: absent, unless it is among the keys left unprocessed.
                        answers.push(match found.remove(id.as_str()) {
                            Some(item) => Ok(Some(item)),
                            None if unread.iter().any(|u| u == id.as_str()) => {
                                Err(StoreError::new(
                                    "the table left this key unprocessed (throttled); retry shortly",
                                ))
                            }
                            None => Ok(None),
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = ?e, "BatchGetItem failed");
                    // Each id's error carries the cause (a timeout, throttling, ...), which
                    // `StoreError`'s own message leaves to its source.
                    let reason = with_causes(&e);
                    answers.extend(chunk.iter().map(|_| Err(StoreError::new(reason.clone()))));
                }
            }
        }
        answers
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
        /// `GetItem`s, and the ids read by batch reads.
        pub reads: AtomicUsize,
        /// Batch reads (each a `BatchGetItem`).
        pub batch_reads: AtomicUsize,
        pub fail: AtomicBool,
        /// Batch reads leave these ids unread, as DynamoDB's `UnprocessedKeys` would.
        pub unprocessed: Mutex<Vec<String>>,
    }

    impl ProductStore for MemoryStore {
        async fn get(&self, id: &ProductId) -> Result<Option<Item>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError("injected failure".into()));
            }
            Ok(self.items.lock().unwrap().get(id.as_str()).cloned())
        }

        async fn get_many(&self, ids: &[ProductId]) -> ManyItems {
            self.batch_reads.fetch_add(1, Ordering::SeqCst);
            self.reads.fetch_add(ids.len(), Ordering::SeqCst);
            let (items, unprocessed) =
                (self.items.lock().unwrap(), self.unprocessed.lock().unwrap());
            ids.iter()
                .map(|id| {
                    if self.fail.load(Ordering::SeqCst) {
                        Err(StoreError::new("injected failure"))
                    } else if unprocessed.iter().any(|u| u == id.as_str()) {
                        Err(StoreError::new("left unprocessed"))
                    } else {
                        Ok(items.get(id.as_str()).cloned())
                    }
                })
                .collect()
        }
    }
}
