//! The read path's HTTP edge: routes `GET /products/{id}`, turns every outcome into a JSON
//! response with an `X-Cache` header, and takes such a response apart again for the callers that
//! print or check it (the command-line tool's demo, the tests).

use std::sync::Arc;

use lambda_http::http::{header, Method, StatusCode};
use lambda_http::{Body, Request, RequestExt as _, Response};
use serde_json::json;

use super::{AfterAnswer, CacheStatus, Lookup, ReadError, ReadPath};
use crate::cache::Cache;
use crate::store::ProductStore;

/// The HTTP edge: routes `GET /products/{id}` and turns every outcome into a JSON response with
/// an `X-Cache` header. Never fails: every error becomes a response. Runs the fill (if any)
/// before it returns, then flushes the read path's metrics, one line per invocation: for callers
/// that cannot run work after their response (the local HTTP server, the tests).
pub async fn handle_request<C: Cache, S: ProductStore>(
    read: &ReadPath<C, S>,
    req: Request,
) -> Result<Response<Body>, std::convert::Infallible> {
    let (response, after) = answer_request(read, req).await;
    after.await;
    Ok(response)
}

/// [`handle_request`] without waiting for the fill: the response, and what is left to do
/// after it (the fill or a lease hand-back, then the metrics flush). The caller sends the
/// response first and must then await the [`AfterAnswer`] within the same invocation (see
/// [`super::deferred`]); the flush comes last so that a refused fill is counted in its own
/// invocation's metrics line.
pub async fn answer_request<C: Cache, S: ProductStore>(
    read: &ReadPath<C, S>,
    req: Request,
) -> (Response<Body>, AfterAnswer) {
    let (response, after) = answer(read, req).await;
    let metrics = Arc::clone(&read.metrics);
    let after = AfterAnswer::run(async move {
        after.await;
        metrics.flush();
    });
    (response, after)
}

async fn answer<C: Cache, S: ProductStore>(
    read: &ReadPath<C, S>,
    req: Request,
) -> (Response<Body>, AfterAnswer) {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            CacheStatus::Bypass,
            "method_not_allowed",
            "only GET is supported",
        );
        return (response, AfterAnswer::nothing());
    }
    let Some(raw_id) = product_id_of(&req) else {
        let response = error(
            StatusCode::NOT_FOUND,
            CacheStatus::Bypass,
            "no_route",
            "expected GET /products/{id}",
        );
        return (response, AfterAnswer::nothing());
    };
    let (status, result, after) = read.answer(&raw_id).await;
    let response = match result {
        Ok(Lookup::Found(doc)) => response(StatusCode::OK, status, doc.into_string()),
        Ok(Lookup::NotFound) => error(
            StatusCode::NOT_FOUND,
            status,
            "not_found",
            "no product with this id",
        ),
        Err(ReadError::InvalidId(e)) => error(
            StatusCode::BAD_REQUEST,
            status,
            "invalid_id",
            &e.to_string(),
        ),
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
    };
    (response, after)
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

/// A response of [`handle_request`] taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The `X-Cache` header: `hit`, `miss` or `bypass`.
    pub x_cache: String,
    pub content_type: String,
    pub body: String,
}

impl Answer {
    pub fn of(response: &Response<Body>) -> Self {
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let body = match response.body() {
            Body::Text(t) => t.clone(),
            Body::Binary(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        Self {
            status: response.status().as_u16(),
            x_cache: header("x-cache"),
            content_type: header("content-type"),
            body,
        }
    }

    /// `GET path` through [`handle_request`], as API Gateway would pass it on.
    pub async fn get<C: Cache, S: ProductStore>(read: &ReadPath<C, S>, path: &str) -> Self {
        let request = lambda_http::http::Request::builder()
            .uri(path)
            .body(Body::Empty)
            .expect("a path is a valid URI");
        Self::of(
            &handle_request(read, request)
                .await
                .unwrap_or_else(|n| match n {}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::memory::MemoryCache;
    use crate::read::tests::read_path;
    use crate::store::memory::MemoryStore;
    use std::sync::atomic::Ordering;

    async fn call(
        rp: &ReadPath<MemoryCache, MemoryStore>,
        method: &str,
        uri: &str,
    ) -> (u16, String, serde_json::Value) {
        let req = lambda_http::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::Empty)
            .unwrap();
        let answer = Answer::of(&handle_request(rp, req).await.unwrap());
        assert_eq!(answer.content_type, "application/json");
        let body = serde_json::from_str(&answer.body).unwrap();
        (answer.status, answer.x_cache, body)
    }

    #[tokio::test]
    async fn the_metrics_line_waits_for_the_fill_and_counts_its_refusal() {
        let rp = read_path();
        rp.cache
            .refuse_fills
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let rp = rp.with_metrics(
            crate::metrics::MetricsSettings::default(),
            crate::metrics::Sink::Memory(lines.clone()),
        );
        let req = lambda_http::http::Request::builder()
            .uri("/products/kb-001")
            .body(Body::Empty)
            .unwrap();
        let (response, after) = answer_request(&rp, req).await;
        assert_eq!(Answer::of(&response).x_cache, "miss");
        assert!(after.is_pending());
        assert!(lines.lock().unwrap().is_empty(), "flushed before the fill");
        after.await;
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(
            (&line["Misses"], &line["RefusedFills"]),
            (&serde_json::json!(1), &serde_json::json!(1)),
            "{line}"
        );
    }

    #[tokio::test]
    async fn an_open_breaker_is_a_bypass_without_fill_lease_or_release() {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let rp = read_path().with_metrics(
            crate::metrics::MetricsSettings::default(),
            crate::metrics::Sink::Memory(lines.clone()),
        );
        rp.cache.breaker_open.store(true, Ordering::SeqCst);
        let (code, xc, body) = call(&rp, "GET", "/products/kb-001").await;
        assert_eq!(
            (code, xc.as_str(), &body["price"]),
            (200, "bypass", &serde_json::json!(129.99))
        );
        // The probe only: no fill, no release after it.
        assert_eq!(rp.cache.calls.load(Ordering::SeqCst), 1);
        assert!(rp.cache.leases.lock().unwrap().is_empty());
        let line: serde_json::Value = serde_json::from_str(&lines.lock().unwrap()[0]).unwrap();
        assert_eq!(
            (&line["Bypasses"], &line["BreakerBypasses"], &line["Misses"]),
            (
                &serde_json::json!(1),
                &serde_json::json!(1),
                &serde_json::json!(0)
            ),
            "{line}"
        );
        // Another failure is a bypass, but not the breaker's.
        rp.cache.breaker_open.store(false, Ordering::SeqCst);
        rp.cache.fail.store(true, Ordering::SeqCst);
        assert_eq!(call(&rp, "GET", "/products/kb-001").await.1, "bypass");
        let line: serde_json::Value = serde_json::from_str(&lines.lock().unwrap()[1]).unwrap();
        assert_eq!(
            (&line["Bypasses"], &line["BreakerBypasses"]),
            (&serde_json::json!(1), &serde_json::json!(0)),
            "{line}"
        );
    }

    #[tokio::test]
    async fn http_edge_maps_every_outcome_to_json() {
        let rp = read_path();
        let (code, xc, body) = call(&rp, "GET", "/products/kb-001").await;
        assert_eq!(
            (code, xc.as_str(), &body["price"]),
            (200, "miss", &serde_json::json!(129.99))
        );
        assert_eq!(call(&rp, "GET", "/products/kb-001").await.1, "hit");
        let (code, _, body) = call(&rp, "GET", "/products/missing").await;
        assert_eq!((code, body["error"].as_str()), (404, Some("not_found")));
        let (code, xc, body) = call(&rp, "GET", "/products/%7Bkb%7D").await;
        assert_eq!(
            (code, xc.as_str(), body["error"].as_str()),
            (400, "bypass", Some("invalid_id"))
        );
        let (code, _, _) = call(&rp, "GET", "/products/").await;
        assert_eq!(code, 400);
        let (code, _, body) = call(&rp, "GET", "/elsewhere").await;
        assert_eq!((code, body["error"].as_str()), (404, Some("no_route")));
        let (code, _, _) = call(&rp, "POST", "/products/kb-001").await;
        assert_eq!(code, 405);

        rp.store.fail.store(true, Ordering::SeqCst);
        let (code, xc, body) = call(&rp, "GET", "/products/other").await;
        assert_eq!(
            (code, xc.as_str(), body["error"].as_str()),
            (503, "miss", Some("unavailable"))
        );
        assert!(
            !body.to_string().contains("injected"),
            "internals leaked: {body}"
        );
    }
}
