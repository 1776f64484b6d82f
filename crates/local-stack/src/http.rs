//! The read path over local HTTP, as API Gateway (HTTP API) fronts the read function.
//!
//! A thin adapter: the routes `GET /products/{id}` and `GET /products` (`?ids=ID1,ID2,...`)
//! turn the request into the [`lambda_http::Request`] that `lambda_http` builds from a payload
//! v2 event (route key, path parameter, query string, raw path, request context) and hand it to
//! [`product_cache::read::handle_request`], the function the Lambda runs. Any other method or
//! path gets API Gateway's own `404 {"message":"Not Found"}` without reaching the handler, as a
//! deployed HTTP API with only those routes would answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use lambda_http::aws_lambda_events::apigw::{
    ApiGatewayV2httpRequestContext, ApiGatewayV2httpRequestContextHttpDescription,
};
use lambda_http::request::RequestContext;
use lambda_http::RequestExt as _;
use product_cache::cache::Cache;
use product_cache::read::{handle_request, ReadPath};
use product_cache::store::ProductStore;

/// The HTTP API's routes, as the template declares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /products/{id}`: one product.
    Product,
    /// `GET /products`: many, `?ids=ID1,ID2,...`.
    Products,
}

impl Route {
    /// The route key API Gateway puts in the event's `routeKey`.
    pub fn key(self) -> &'static str {
        match self {
            Route::Product => "GET /products/{id}",
            Route::Products => "GET /products",
        }
    }
}

/// API Gateway's payload limit; larger requests are refused before reaching the function.
const MAX_BODY: usize = 10 * 1024 * 1024;

/// Products answered, by `X-Cache`, for the status line: a batch counts each of its products
/// (its header says `hits=H misses=M bypasses=B`), as the read function's metrics do.
#[derive(Debug, Default)]
pub struct HttpStats {
    pub requests: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bypasses: AtomicU64,
}

impl HttpStats {
    fn count(&self, response: &lambda_http::Response<lambda_http::Body>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let Some(x_cache) = response
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        let add = |counter: &AtomicU64, n: u64| {
            counter.fetch_add(n, Ordering::Relaxed);
        };
        match x_cache {
            "hit" => add(&self.hits, 1),
            "miss" => add(&self.misses, 1),
            "bypass" => add(&self.bypasses, 1),
            batch => {
                for (name, n) in batch.split(' ').filter_map(|part| part.split_once('=')) {
                    let Ok(n) = n.parse() else { continue };
                    match name {
                        "hits" => add(&self.hits, n),
                        "misses" => add(&self.misses, n),
                        "bypasses" => add(&self.bypasses, n),
                        _ => {}
                    }
                }
            }
        }
    }
}

struct App<C, S> {
    read: Arc<ReadPath<C, S>>,
    stats: Arc<HttpStats>,
}

/// The HTTP API: `GET /products/{id}` and `GET /products` to the read function's handler,
/// everything else 404.
///
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so the request context
/// carries the caller's address, as API Gateway's `sourceIp` does.
pub fn router<C, S>(read: Arc<ReadPath<C, S>>, stats: Arc<HttpStats>) -> Router
where
    C: Cache + 'static,
    S: ProductStore + 'static,
{
    Router::new()
        // `any`, not `get`: axum would also route HEAD to a GET handler, and API Gateway
        // matches the method exactly.
        .route("/products/{id}", any(product::<C, S>))
        .route("/products", any(products::<C, S>))
        .fallback(|| async { not_found() })
        .with_state(Arc::new(App { read, stats }))
}

async fn product<C: Cache, S: ProductStore>(
    State(app): State<Arc<App<C, S>>>,
    request: Request,
) -> Response {
    answer(&app, request, Route::Product).await
}

async fn products<C: Cache, S: ProductStore>(
    State(app): State<Arc<App<C, S>>>,
    request: Request,
) -> Response {
    answer(&app, request, Route::Products).await
}

/// One request that matched `route`, through the read function's handler.
async fn answer<C: Cache, S: ProductStore>(
    app: &App<C, S>,
    request: Request,
    route: Route,
) -> Response {
    if request.method() != Method::GET {
        return not_found();
    }
    // Present when served with connect info (see `router`); absent in tests that call the
    // router directly.
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(_) => {
            return api_gateway_message(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large")
        }
    };
    let request = axum::http::Request::from_parts(parts, body);
    let request_id = format!("{:016x}", fastrand::u64(..));
    let lambda_request = to_lambda_request(request, route, peer, &request_id);
    let Ok(response) = handle_request(&app.read, lambda_request).await;
    app.stats.count(&response);
    let mut response = from_lambda_response(response);
    if let Ok(id) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("apigw-requestid", id);
    }
    response
}

/// The request the read function receives for this HTTP request under `route`: what
/// `lambda_http` builds from API Gateway's payload v2 event.
///
/// For [`Route::Product`] the path must be `/products/{id}` with a non-empty, single-segment id
/// (the route guarantees it); `id` is percent-decoded, as API Gateway decodes path parameters.
/// [`Route::Products`] has no path parameter. The query string reaches the function as sent
/// (`rawQueryString`, and so the request's URI, which `lambda_http` builds from it): the batch
/// route splits its ids there, where an id's own `%2C` is still told apart from the commas
/// between ids.
pub fn to_lambda_request(
    request: axum::http::Request<Bytes>,
    route: Route,
    peer: Option<SocketAddr>,
    request_id: &str,
) -> lambda_http::Request {
    let (parts, body) = request.into_parts();
    let raw_path = parts.uri.path().to_owned();
    // API Gateway leaves `pathParameters` out of the event of a route without any.
    let path_parameters = match route {
        Route::Product => {
            let raw_id = raw_path.strip_prefix("/products/").unwrap_or_default();
            let id = percent_encoding::percent_decode_str(raw_id)
                .decode_utf8_lossy()
                .into_owned();
            std::collections::HashMap::from([("id".to_owned(), id)])
        }
        Route::Products => std::collections::HashMap::new(),
    };
    let raw_query = parts.uri.query().unwrap_or_default().to_owned();
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let now = std::time::SystemTime::now();

    let mut http = ApiGatewayV2httpRequestContextHttpDescription::default();
    http.method = parts.method.clone();
    http.path = Some(raw_path.clone());
    http.protocol = Some(format!("{:?}", parts.version));
    http.source_ip = peer.map(|p| p.ip().to_string());
    http.user_agent = user_agent;
    let mut context = ApiGatewayV2httpRequestContext::default();
    context.route_key = Some(route.key().into());
    context.account_id = Some("000000000000".into());
    context.stage = Some("$default".into());
    context.request_id = Some(request_id.to_owned());
    context.apiid = Some("local".into());
    context.domain_name = host.clone();
    context.domain_prefix = host
        .as_deref()
        .map(|h| h.split(['.', ':']).next().unwrap_or(h).to_owned());
    context.time = Some(humantime::format_rfc3339_millis(now).to_string());
    context.time_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    context.http = http;

    // API Gateway sends text bodies as they are and anything else base64-encoded, which
    // `lambda_http` turns back into bytes.
    let body = if body.is_empty() {
        lambda_http::Body::Empty
    } else {
        match String::from_utf8(body.to_vec()) {
            Ok(text) => lambda_http::Body::Text(text),
            Err(e) => lambda_http::Body::Binary(e.into_bytes()),
        }
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let uri = match &host {
        Some(host) => format!("http://{host}{path_and_query}"),
        None => path_and_query,
    };
    let mut builder = lambda_http::http::Request::builder()
        .method(parts.method)
        .uri(uri);
    if let Some(headers) = builder.headers_mut() {
        *headers = parts.headers;
        // What API Gateway adds for the function.
        if let Some(peer) = peer {
            if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
                headers.insert("x-forwarded-for", v);
            }
            headers.insert("x-forwarded-port", HeaderValue::from(peer.port()));
        }
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    let request = builder
        .body(body)
        // Every part came from a request hyper already parsed.
        .expect("parts of a valid request");
    request
        .with_raw_http_path(raw_path)
        .with_query_string_parameters(
            raw_query
                .parse::<lambda_http::aws_lambda_events::query_map::QueryMap>()
                .unwrap_or_default(),
        )
        .with_path_parameters(path_parameters)
        .with_request_context(RequestContext::ApiGatewayV2(context))
}

/// The function's response as API Gateway returns it to the client.
pub fn from_lambda_response(response: lambda_http::Response<lambda_http::Body>) -> Response {
    let (parts, body) = response.into_parts();
    let body = match body {
        lambda_http::Body::Empty => axum::body::Body::empty(),
        lambda_http::Body::Text(text) => axum::body::Body::from(text),
        lambda_http::Body::Binary(bytes) => axum::body::Body::from(bytes),
        // `Body` is non-exhaustive; a later variant would need its own mapping.
        other => axum::body::Body::from(format!("{other:?}")),
    };
    Response::from_parts(parts, body)
}

/// API Gateway's answer for a request that matches no route.
pub fn not_found() -> Response {
    api_gateway_message(StatusCode::NOT_FOUND, "Not Found")
}

fn api_gateway_message(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "message": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, body: &'static [u8]) -> axum::http::Request<Bytes> {
        axum::http::Request::builder()
            .method("GET")
            .uri(uri)
            .header("host", "127.0.0.1:3000")
            .header("user-agent", "curl/8")
            .body(Bytes::from_static(body))
            .unwrap()
    }

    #[test]
    fn builds_the_request_api_gateway_v2_would_deliver() {
        let peer: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let req = to_lambda_request(
            request("/products/a%20b%2Fc?x=1&x=2&y=", b""),
            Route::Product,
            Some(peer),
            "req-1",
        );
        assert_eq!(req.path_parameters().first("id"), Some("a b/c"));
        assert_eq!(req.raw_http_path(), "/products/a%20b%2Fc");
        assert_eq!(req.query_string_parameters().all("x"), Some(vec!["1", "2"]));
        assert_eq!(
            req.uri().to_string(),
            "http://127.0.0.1:3000/products/a%20b%2Fc?x=1&x=2&y="
        );
        assert_eq!(req.headers()["x-forwarded-for"], "127.0.0.1");
        assert!(matches!(req.body(), lambda_http::Body::Empty));
        let Some(RequestContext::ApiGatewayV2(ctx)) = req.request_context_ref() else {
            panic!("no API Gateway v2 context");
        };
        assert_eq!(ctx.route_key.as_deref(), Some("GET /products/{id}"));
        assert_eq!(ctx.stage.as_deref(), Some("$default"));
        assert_eq!(ctx.request_id.as_deref(), Some("req-1"));
        assert_eq!(ctx.http.method, Method::GET);
        assert_eq!(ctx.http.source_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(ctx.http.user_agent.as_deref(), Some("curl/8"));
    }

    #[test]
    fn the_batch_route_hands_the_query_string_on_as_sent() {
        let req = to_lambda_request(
            request("/products?ids=kb-001,kb%2C002,caf%C3%A9&v=2", b""),
            Route::Products,
            None,
            "r",
        );
        let Some(RequestContext::ApiGatewayV2(ctx)) = req.request_context_ref() else {
            panic!("no API Gateway v2 context");
        };
        assert_eq!(ctx.route_key.as_deref(), Some("GET /products"));
        assert_eq!(req.raw_http_path(), "/products");
        assert!(req.path_parameters().is_empty(), "API Gateway sends none");
        // `rawQueryString`, undecoded: the id `kb,002` is still one id here...
        assert_eq!(req.uri().query(), Some("ids=kb-001,kb%2C002,caf%C3%A9&v=2"));
        let ids =
            product_cache::read::BatchIds::parse(req.uri().query(), product_cache::id::KeyType::S)
                .unwrap();
        let ids: Vec<_> = ids.as_slice().iter().map(|id| id.as_str()).collect();
        assert_eq!(ids, ["kb-001", "kb,002", "café"]);
        // ...and no longer in the decoded parameters, as in API Gateway's `queryStringParameters`.
        assert_eq!(
            req.query_string_parameters().first("ids"),
            Some("kb-001,kb,002,café")
        );
    }

    #[test]
    fn a_batch_counts_each_of_its_products() {
        let stats = HttpStats::default();
        for x_cache in [
            "hit",
            "hits=3 misses=2 bypasses=1",
            "miss",
            "hits=0 misses=0 bypasses=0",
        ] {
            let response = lambda_http::Response::builder()
                .header("x-cache", x_cache)
                .body(lambda_http::Body::Empty)
                .unwrap();
            stats.count(&response);
        }
        let got = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(
            (
                got(&stats.requests),
                got(&stats.hits),
                got(&stats.misses),
                got(&stats.bypasses)
            ),
            (4, 4, 3, 1)
        );
    }

    #[test]
    fn bodies_become_text_or_binary() {
        let text = to_lambda_request(request("/products/x", b"{}"), Route::Product, None, "r");
        assert!(matches!(text.body(), lambda_http::Body::Text(t) if t == "{}"));
        let binary = to_lambda_request(
            request("/products/x", b"\xff\x00"),
            Route::Product,
            None,
            "r",
        );
        assert!(matches!(binary.body(), lambda_http::Body::Binary(b) if b == b"\xff\x00"));
    }

    #[tokio::test]
    async fn responses_keep_status_headers_and_bytes() {
        let lambda = lambda_http::Response::builder()
            .status(418)
            .header("x-cache", "hit")
            .body(lambda_http::Body::Binary(vec![1, 2, 3]))
            .unwrap();
        let response = from_lambda_response(lambda);
        assert_eq!(response.status(), 418);
        assert_eq!(response.headers()["x-cache"], "hit");
        let bytes = axum::body::to_bytes(response.into_body(), 16)
            .await
            .unwrap();
        assert_eq!(&bytes[..], &[1, 2, 3]);
    }
}
