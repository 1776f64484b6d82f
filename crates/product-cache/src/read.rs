//! The read path: cache-aside for `GET /products/{id}`.
//!
//! [`ReadPath::get`] holds the logic; [`handle_request`] is the HTTP edge (API Gateway HTTP API,
//! payload v2, through `lambda_http`), used unchanged by the Lambda and by the local stack.

use lambda_http::http::{header, Method, StatusCode};
use lambda_http::{Body, Request, RequestExt as _, Response};
use serde_json::json;

use crate::cache::{Cache, NOT_FOUND};
use crate::config::CacheSettings;
use crate::document::{Document, DocumentError};
use crate::id::{InvalidId, ProductId};
use crate::store::{ProductStore, StoreError};

/// How the cache took part in an answer; sent as the `X-Cache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Answered from Redis.
    Hit,
    /// Redis answered that it had nothing; the table did, and the answer was cached.
    Miss,
    /// Redis was not used: it failed or timed out (or the request never got that far).
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
        }
    }
}

/// A successful lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Document),
    NotFound,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The caller's mistake.
    #[error(transparent)]
    InvalidId(#[from] InvalidId),
    /// The table failed; the cache could not answer either.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The table holds an item with no JSON form (not expected from real DynamoDB).
    #[error(transparent)]
    Document(#[from] DocumentError),
}

/// Cache-aside over a [`Cache`] and a [`ProductStore`]. Built once per process; cheap to share.
pub struct ReadPath<C, S> {
    cache: C,
    store: S,
    settings: CacheSettings,
}

impl<C: Cache, S: ProductStore> ReadPath<C, S> {
    pub fn new(cache: C, store: S, settings: CacheSettings) -> Self {
        Self {
            cache,
            store,
            settings,
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    pub fn cache(&self) -> &C {
        &self.cache
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Looks a product up. The status is returned also on error, for the `X-Cache` header.
    #[tracing::instrument(skip(self), fields(cache))]
    pub async fn get(&self, raw_id: &str) -> (CacheStatus, Result<Lookup, ReadError>) {
        let id = match ProductId::parse(raw_id, self.settings.key_type) {
            Ok(id) => id,
            Err(e) => return (CacheStatus::Bypass, Err(e.into())),
        };
        let key = id.cache_key(&self.settings.key_prefix);

        let status = match self.cache.get(&key).await {
            Ok(Some(cached)) if cached == NOT_FOUND => return (CacheStatus::Hit, Ok(Lookup::NotFound)),
            Ok(Some(cached)) => {
                return (
                    CacheStatus::Hit,
                    Ok(Lookup::Found(Document::from_cached(cached))),
                )
            }
            Ok(None) => CacheStatus::Miss,
            Err(e) => {
                tracing::warn!(error = %e, key, "cache read failed; answering from the table");
                CacheStatus::Bypass
            }
        };
        tracing::Span::current().record("cache", status.as_str());

        let lookup = match self.store.get(&id).await {
            Ok(Some(item)) => match Document::from_item(&item) {
                Ok(doc) => Lookup::Found(doc),
                Err(e) => return (status, Err(e.into())),
            },
            Ok(None) => Lookup::NotFound,
            Err(e) => return (status, Err(e.into())),
        };

        // After a failed read Redis is presumed down: a fill would only spend another timeout.
        if status == CacheStatus::Miss {
            let (value, ttl) = match &lookup {
                Lookup::Found(doc) => (doc.as_str(), self.settings.ttl),
                Lookup::NotFound => (NOT_FOUND, self.settings.negative_ttl),
            };
            if let Err(e) = self.cache.set(&key, value, ttl).await {
                tracing::warn!(error = %e, key, "cache fill failed");
            }
        }
        (status, Ok(lookup))
    }
}

/// The HTTP edge: routes `GET /products/{id}` and turns every outcome into a JSON response with
/// an `X-Cache` header. Never fails: every error becomes a response.
pub async fn handle_request<C: Cache, S: ProductStore>(
    read: &ReadPath<C, S>,
    req: Request,
) -> Result<Response<Body>, std::convert::Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            CacheStatus::Bypass,
            "method_not_allowed",
            "only GET is supported",
        ));
    }
    let Some(raw_id) = product_id_of(&req) else {
        return Ok(error(
            StatusCode::NOT_FOUND,
            CacheStatus::Bypass,
            "no_route",
            "expected GET /products/{id}",
        ));
    };
    let (status, result) = read.get(&raw_id).await;
    Ok(match result {
        Ok(Lookup::Found(doc)) => response(StatusCode::OK, status, doc.into_string()),
        Ok(Lookup::NotFound) => error(
            StatusCode::NOT_FOUND,
            status,
            "not_found",
            "no product with this id",
        ),
        Err(ReadError::InvalidId(e)) => {
            error(StatusCode::BAD_REQUEST, status, "invalid_id", &e.to_string())
        }
        Err(e @ ReadError::Store(_)) => {
            tracing::error!(error = ?e, "answering 503");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                status,
                "unavailable",
                "the product catalog is temporarily unavailable; retry shortly",
            )
        }
        Err(e @ ReadError::Document(_)) => {
            tracing::error!(error = ?e, "answering 500");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                status,
                "internal",
                "the product could not be encoded",
            )
        }
    })
}

/// The `{id}` of `/products/{id}`: API Gateway's path parameter when the route declared it, else
/// the last segment of the raw path (a `$default` route, or the local HTTP server).
fn product_id_of(req: &Request) -> Option<String> {
    if let Some(id) = req.path_parameters().first("id") {
        return Some(id.to_owned());
    }
    let rest = req.uri().path().strip_prefix("/products/")?;
    if rest.contains('/') {
        return None;
    }
    Some(
        percent_encoding::percent_decode_str(rest)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

fn error(code: StatusCode, status: CacheStatus, kind: &str, message: &str) -> Response<Body> {
    let body = json!({ "error": kind, "message": message }).to_string();
    response(code, status, body)
}

fn response(code: StatusCode, status: CacheStatus, body: String) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-cache", status.as_str())
        .body(Body::Text(body))
        .expect("static headers are valid")
}
