//! Forming a connection in the background, within its own budget.
//!
//! A cold connect is DNS, a TCP and a TLS handshake and AUTH (and the slot map on a cluster): on
//! a small Lambda that can take longer than one request's `REDIS_TIMEOUT_MS`. So the attempt
//! runs in a task of its own, bounded by `REDIS_CONNECT_TIMEOUT_MS`, and starts when the cache
//! is built (during the function's init). Requests wait for it at most their own timeout; one
//! that gives up (and bypasses the cache) leaves the attempt running for the next. A failed
//! attempt is dropped, and the next request starts another. Once formed, the connection
//! reconnects by itself (the connection manager and the cluster client both do).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt as _, Shared};

use super::CacheError;

type Attempt<T> = Shared<BoxFuture<'static, Result<T, Arc<redis::RedisError>>>>;

pub(super) struct Connector<T> {
    ready: OnceLock<T>,
    attempt: Mutex<Option<Attempt<T>>>,
    connect: Box<dyn Fn() -> BoxFuture<'static, redis::RedisResult<T>> + Send + Sync>,
}

impl<T: Clone + Send + Sync + 'static> Connector<T> {
    /// Starts the first attempt now: call it inside the runtime.
    pub fn start(
        connect: impl Fn() -> BoxFuture<'static, redis::RedisResult<T>> + Send + Sync + 'static,
    ) -> Self {
        let connector = Self {
            ready: OnceLock::new(),
            attempt: Mutex::new(None),
            connect: Box::new(connect),
        };
        // The task runs whether or not anyone awaits the shared handle.
        drop(connector.attempt());
        connector
    }

    /// The connection, waiting for a forming one at most `wait`.
    pub async fn get(&self, wait: Duration) -> Result<T, CacheError> {
        if let Some(conn) = self.ready.get() {
            return Ok(conn.clone());
        }
        let attempt = self.attempt();
        match tokio::time::timeout(wait, attempt.clone()).await {
            Err(_) => Err(CacheError::Connecting(wait)),
            Ok(Ok(conn)) => Ok(self.ready.get_or_init(|| conn).clone()),
            Ok(Err(e)) => {
                // Drop the failed attempt (unless another request already replaced it), so the
                // next request tries again.
                let mut current = self.attempt.lock().unwrap();
                if current.as_ref().is_some_and(|a| a.ptr_eq(&attempt)) {
                    *current = None;
                }
                Err(CacheError::Connect(e))
            }
        }
    }

    /// The attempt in progress, or a new one running in a task of its own (so it progresses
    /// while no request waits for it).
    fn attempt(&self) -> Attempt<T> {
        let mut current = self.attempt.lock().unwrap();
        if let Some(attempt) = current.as_ref() {
            return attempt.clone();
        }
        let task = tokio::spawn((self.connect)());
        let attempt: Attempt<T> = async move {
            match task.await {
                Ok(result) => result.map_err(Arc::new),
                Err(e) => Err(Arc::new(redis::RedisError::from(std::io::Error::other(e)))),
            }
        }
        .boxed()
        .shared();
        *current = Some(attempt.clone());
        attempt
    }
}
