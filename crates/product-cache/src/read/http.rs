//! The read path's HTTP edge: routes `GET /products/{id}` and `GET /products?ids=...`, turns
//! every outcome into a JSON response with an `X-Cache` header, and takes such a response apart again for the callers that
//! print or check it (the command-line tool's demo, the tests).

use std::sync::Arc;

use lambda_http::http::{header, Method, StatusCode};
use lambda_http::{Body, Request, RequestExt as _, Response};
use serde_json::json;

use super::{AfterAnswer, BatchAnswer, BatchIds, CacheStatus, Lookup, ReadError, ReadPath};
use crate::cache::Cache;
use crate::metrics;
use crate::store::ProductStore;

/// Lambda's limit on a synchronous function's response, the API Gateway envelope included.
pub const LAMBDA_RESPONSE_LIMIT: usize = 6 * 1024 * 1024;
/// What the envelope around the body takes (status, headers, the body's quotes), with room
/// to spare: a body whose JSON-escaped form is within the limit less this fits.
const ENVELOPE: usize = 4 * 1024;

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
    if is_batch_route(&req) {
        // Boxed: the batch's future is large and deeply nested, and every caller's future
        // (the local stack's, the Lambda runtime's) would otherwise hold it inline, past the
        // compiler's default depth for computing their layouts.
        return Box::pin(answer_batch(read, &req)).await;
    }
    let Some(raw_id) = product_id_of(&req) else {
        let response = error(
            StatusCode::NOT_FOUND,
            CacheStatus::Bypass,
            "no_route",
            "expected GET /products/{id} or GET /products?ids=ID1,ID2,...",
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

/// Whether `req` asks for many products: API Gateway's route `GET /products`, or the path
/// `/products` exactly (a `$default` route, or the local HTTP server; `/products/` is the single
/// route with an empty id, a 400 as before).
fn is_batch_route(req: &Request) -> bool {
    use lambda_http::request::RequestContext;
    match req.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(ctx)) if ctx.route_key.as_deref() != Some("$default") => {
            ctx.route_key.as_deref() == Some("GET /products")
        }
        _ => req.uri().path() == "/products",
    }
}

/// `GET /products?ids=...`: 200 with every product asked for, in request order, each with
/// its document, `null` for one the table does not have, or its error (the table failed it);
/// `X-Cache: hits=H misses=M bypasses=B`. A request that is not one is a 400 before any call;
/// a batch the table failed entirely a 503, as a single read's; an answer past Lambda's
/// response limit a 413 (the fills still run: the products were read).
async fn answer_batch<C: Cache, S: ProductStore>(
    read: &ReadPath<C, S>,
    req: &Request,
) -> (Response<Body>, AfterAnswer) {
    let ids = match BatchIds::parse(req.uri().query(), read.settings.key_type) {
        Ok(ids) => ids,
        Err(e) => {
            read.metrics.incr(metrics::read::INVALID_REQUESTS);
            let body = json!({ "error": "invalid_ids", "message": e.to_string() }).to_string();
            let response = respond(StatusCode::BAD_REQUEST, &batch_header(None), body);
            return (response, AfterAnswer::nothing());
        }
    };
    let (answer, after) = read.answer_many(&ids).await;
    let header = batch_header(Some(&answer));
    let unavailable = |e: &ReadError| matches!(e, ReadError::Store(_));
    if answer
        .entries
        .iter()
        .all(|e| e.result.as_ref().is_err_and(unavailable))
    {
        tracing::error!(
            products = answer.entries.len(),
            "answering 503: the table failed the whole batch"
        );
        let body = json!({
            "error": "unavailable",
            "message": "the product catalog is temporarily unavailable; retry shortly",
        });
        return (
            respond(StatusCode::SERVICE_UNAVAILABLE, &header, body.to_string()),
            after,
        );
    }
    let body = batch_body(&answer);
    let size = escaped_len(&body);
    if size + ENVELOPE > LAMBDA_RESPONSE_LIMIT {
        tracing::warn!(
            bytes = size,
            products = answer.entries.len(),
            "batch answer too large for Lambda"
        );
        let message = format!(
            "the {} products come to {size} bytes, past Lambda's {LAMBDA_RESPONSE_LIMIT}-byte response limit; ask for fewer ids per request",
            answer.entries.len()
        );
        let body = json!({ "error": "response_too_large", "message": message }).to_string();
        return (respond(StatusCode::PAYLOAD_TOO_LARGE, &header, body), after);
    }
    (respond(StatusCode::OK, &header, body), after)
}

/// `{"products": [...]}`, each document inserted as cached: it is JSON already, and parsing
/// then printing it again would cost the hit path what the cache saves.
fn batch_body(answer: &BatchAnswer) -> String {
    let mut body = String::with_capacity(
        64 + answer
            .entries
            .iter()
            .map(|e| match &e.result {
                Ok(Lookup::Found(doc)) => doc.as_str().len() + e.id.as_str().len() + 32,
                _ => 96,
            })
            .sum::<usize>(),
    );
    body.push_str(r#"{"products":["#);
    for (n, entry) in answer.entries.iter().enumerate() {
        if n > 0 {
            body.push(',');
        }
        let id = serde_json::Value::from(entry.id.as_str());
        match &entry.result {
            Ok(Lookup::Found(doc)) => {
                body.push_str(&format!(r#"{{"id":{id},"product":{}}}"#, doc.as_str()))
            }
            Ok(Lookup::NotFound) => body.push_str(&format!(r#"{{"id":{id},"product":null}}"#)),
            Err(e) => {
                let (kind, message) = match e {
                    ReadError::Store(_) => (
                        "unavailable",
                        "the product catalog could not be read for this product; retry shortly",
                    ),
                    _ => ("internal", "the product could not be encoded"),
                };
                tracing::error!(error = ?e, id = entry.id.as_str(), "a batch entry failed");
                body.push_str(
                    &json!({ "id": entry.id.as_str(), "error": kind, "message": message })
                        .to_string(),
                );
            }
        }
    }
    body.push_str("]}");
    body
}

/// The length of `body` as a JSON string inside the response Lambda returns: quotes,
/// backslashes and control characters take two bytes there (six for most controls).
fn escaped_len(body: &str) -> usize {
    body.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
        + 2
}

/// A batch's `X-Cache`: how many of its products were hits, misses and bypasses.
fn batch_header(answer: Option<&BatchAnswer>) -> String {
    let count = |status| answer.map_or(0, |a| a.count(status));
    format!(
        "hits={} misses={} bypasses={}",
        count(CacheStatus::Hit),
        count(CacheStatus::Miss),
        count(CacheStatus::Bypass)
    )
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
    respond(code, status.as_str(), body)
}

fn respond(code: StatusCode, x_cache: &str, body: String) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-cache", x_cache)
        .body(Body::Text(body))
        .expect("the headers are ASCII")
}

/// A response of [`handle_request`] taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The `X-Cache` header: `hit`, `miss` or `bypass`; for a batch, `hits=H misses=M
    /// bypasses=B`.
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

    #[tokio::test]
    async fn a_batch_answers_every_id_in_order_with_a_header_to_read() {
        let rp = read_path();
        let (code, xc, body) = call(&rp, "GET", "/products?ids=kb-001,nope,kb-001").await;
        assert_eq!((code, xc.as_str()), (200, "hits=0 misses=2 bypasses=0"));
        assert_eq!(
            body,
            serde_json::json!({"products": [
                {"id": "kb-001", "product": {"price": 129.99, "productId": "kb-001"}},
                {"id": "nope", "product": null},
            ]})
        );
        let (_, xc, _) = call(&rp, "GET", "/products?ids=nope,kb-001").await;
        assert_eq!(xc, "hits=2 misses=0 bypasses=0");
        // An id holding a comma arrives encoded, and is one id.
        let (code, _, body) = call(&rp, "GET", "/products?ids=a%2Cb").await;
        assert_eq!(
            (code, &body["products"][0]["id"]),
            (200, &serde_json::json!("a,b"))
        );
    }

    #[tokio::test]
    async fn bad_batches_are_400s_that_name_the_problem_before_any_call() {
        let rp = read_path();
        let many = (0..101)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        for (query, says) in [
            ("", "missing"),
            ("?ids=", "empty"),
            ("?ids=a&ids=b", "more than once"),
            (&format!("?ids={many}") as &str, "101 ids"),
            ("?ids=a,%7Bb%7D", "id 2"),
            ("?ids=a,,b", "id 2"),
            ("?ids=%FF", "UTF-8"),
        ] {
            let (code, xc, body) = call(&rp, "GET", &format!("/products{query}")).await;
            assert_eq!(
                (code, body["error"].as_str()),
                (400, Some("invalid_ids")),
                "{query}"
            );
            assert_eq!(xc, "hits=0 misses=0 bypasses=0");
            let message = body["message"].as_str().unwrap();
            assert!(message.contains(says), "{query}: {message}");
        }
        assert_eq!(rp.cache.calls.load(Ordering::SeqCst), 0);
        assert_eq!(rp.store.reads.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_table_failure_fails_its_products_only_or_the_whole_batch_with_503() {
        let rp = read_path();
        assert_eq!(call(&rp, "GET", "/products/kb-001").await.1, "miss");
        rp.store.fail.store(true, Ordering::SeqCst);
        let (code, xc, body) = call(&rp, "GET", "/products?ids=kb-001,other").await;
        assert_eq!((code, xc.as_str()), (200, "hits=1 misses=1 bypasses=0"));
        assert_eq!(
            body["products"][0]["product"]["price"],
            serde_json::json!(129.99)
        );
        assert_eq!(
            (
                body["products"][1]["id"].as_str(),
                body["products"][1]["error"].as_str()
            ),
            (Some("other"), Some("unavailable"))
        );
        assert!(body["products"][1].get("product").is_none(), "{body}");
        let (code, _, body) = call(&rp, "GET", "/products?ids=other,more").await;
        assert_eq!((code, body["error"].as_str()), (503, Some("unavailable")));
        assert!(
            !body.to_string().contains("injected"),
            "internals leaked: {body}"
        );
    }

    #[tokio::test]
    async fn an_answer_past_lambdas_limit_is_a_clear_413_never_a_cut_body() {
        let rp = read_path();
        // Quotes count twice in Lambda's response: 40 documents of ~90,000 quotes each pass
        // 6 MB escaped while their plain length stays under it.
        let doc = format!("{{\"tags\":[{}]}}", vec!["\"\""; 45_000].join(","));
        assert!(doc.len() * 40 < LAMBDA_RESPONSE_LIMIT);
        for i in 0..40 {
            rp.cache.entries.lock().unwrap().insert(
                format!("product:big{i}"),
                (doc.clone(), std::time::Duration::from_secs(60)),
            );
        }
        let ids = (0..40)
            .map(|i| format!("big{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let (code, xc, body) = call(&rp, "GET", &format!("/products?ids={ids}")).await;
        assert_eq!(
            (code, body["error"].as_str()),
            (413, Some("response_too_large"))
        );
        assert_eq!(xc, "hits=40 misses=0 bypasses=0");
        let (code, _, body) = call(
            &rp,
            "GET",
            &format!("/products?ids={}", &ids[..ids.len() / 2]),
        )
        .await;
        assert_eq!(code, 200);
        assert!(body["products"].as_array().unwrap().len() >= 19);
    }

    #[test]
    fn the_escaped_length_is_what_serde_json_writes() {
        for body in ["plain", r#"{"a":"b\\c"}"#, "tab\there\nnew \u{1} \u{1f} é"] {
            assert_eq!(
                escaped_len(body),
                serde_json::to_string(body).unwrap().len(),
                "{body:?}"
            );
        }
    }
}
