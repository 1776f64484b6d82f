//! `GET /products/{id}` behind API Gateway (HTTP API, payload v2).

use lambda_http::{service_fn, Error};
use product_cache::read::handle_request;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_http::tracing::init_default_subscriber();
    // Clients are built once per execution environment and reused by every invocation.
    let read = product_cache::read_path_from_env()
        .await
        .map_err(product_cache::startup_failed)?;
    lambda_http::run(service_fn(|req| handle_request(&read, req))).await
}
