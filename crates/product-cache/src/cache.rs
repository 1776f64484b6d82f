//! The Redis side: reads, fills and pipelined batches of invalidations, each bounded by a timeout
//! so that a slow or absent Redis costs a request milliseconds, never its answer.

use std::future::Future;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands as _;

/// The value cached under a product's key when the table has no such item. A JSON document is
/// always an object, so `null` cannot be mistaken for one, and a foreign reader doing
/// `JSON.parse` gets `null`, which every such reader already treats as "no product".
pub const NOT_FOUND: &str = "null";

/// One change to the cache, produced by the invalidator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOp {
    Delete {
        key: String,
    },
    Set {
        key: String,
        value: String,
        ttl: Duration,
    },
}

impl CacheOp {
    pub fn key(&self) -> &str {
        match self {
            CacheOp::Delete { key } | CacheOp::Set { key, .. } => key,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis error")]
    Redis(#[from] redis::RedisError),
}

/// What the read path and the invalidator need from a cache. A trait so the logic can be unit
/// tested against an in-memory map and so tests can count or fail calls to a real Redis.
pub trait Cache: Send + Sync {
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<String>, CacheError>> + Send;
    fn set(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), CacheError>> + Send;
    /// Applies `ops` in order, in one round trip.
    fn apply(&self, ops: &[CacheOp]) -> impl Future<Output = Result<(), CacheError>> + Send;
}

/// A Redis cache through a [`ConnectionManager`], which reconnects by itself: a Lambda
/// environment thawed after minutes may hold a connection the server has long closed.
#[derive(Clone)]
pub struct RedisCache {
    conn: ConnectionManager,
    timeout: Duration,
}

impl RedisCache {
    /// Builds the client without connecting, so a function whose Redis is down still starts and
    /// serves from DynamoDB; the first command connects.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, CacheError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Reconnect attempts happen in the background of the next commands; keep them few
            // and short so a dead Redis is noticed quickly and retried on later requests.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(100));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self { conn, timeout })
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CacheError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(CacheError::Timeout(self.timeout)),
        }
    }
}

impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        let mut conn = self.conn.clone();
        self.bounded(conn.get(key)).await
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.bounded(conn.set_ex(key, value, ttl.as_secs().max(1)))
            .await
    }

    async fn apply(&self, ops: &[CacheOp]) -> Result<(), CacheError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for op in ops {
            match op {
                CacheOp::Delete { key } => pipe.del(key).ignore(),
                CacheOp::Set { key, value, ttl } => {
                    pipe.set_ex(key, value, ttl.as_secs().max(1)).ignore()
                }
            };
        }
        let mut conn = self.conn.clone();
        // A batch is thousands of commands: give it the per-operation budget per 1,000.
        let budget = self.timeout * (ops.len() / 1000 + 1) as u32;
        match tokio::time::timeout(budget, pipe.query_async::<()>(&mut conn)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(CacheError::Timeout(budget)),
        }
    }
}

/// An in-memory cache for unit tests: no TTLs, optional failure injection.
#[doc(hidden)]
pub mod memory {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct MemoryCache {
        // A std Mutex: it is never held across an await.
        pub entries: Mutex<HashMap<String, (String, Duration)>>,
        pub fail: AtomicBool,
        pub calls: AtomicUsize,
    }

    impl MemoryCache {
        fn enter(&self) -> Result<(), CacheError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                Err(CacheError::Timeout(Duration::ZERO))
            } else {
                Ok(())
            }
        }

        pub fn value(&self, key: &str) -> Option<String> {
            self.entries.lock().unwrap().get(key).map(|e| e.0.clone())
        }
    }

    impl Cache for MemoryCache {
        async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
            self.enter()?;
            Ok(self.value(key))
        }
        async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), CacheError> {
            self.enter()?;
            self.entries
                .lock()
                .unwrap()
                .insert(key.to_owned(), (value.to_owned(), ttl));
            Ok(())
        }
        async fn apply(&self, ops: &[CacheOp]) -> Result<(), CacheError> {
            self.enter()?;
            let mut entries = self.entries.lock().unwrap();
            for op in ops {
                match op {
                    CacheOp::Delete { key } => {
                        entries.remove(key);
                    }
                    CacheOp::Set { key, value, ttl } => {
                        entries.insert(key.clone(), (value.clone(), *ttl));
                    }
                }
            }
            Ok(())
        }
    }
}
