//! `GET /products/{id}` behind API Gateway (HTTP API, payload v2). A miss is answered before
//! its fill, which an internal extension holds the invocation open for (see
//! `product_cache::read::deferred`).

use lambda_http::Error;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_http::tracing::init_default_subscriber();
    // Clients are built once per execution environment and reused by every invocation.
    let read = product_cache::read_path_from_env()
        .await
        .map_err(product_cache::startup_failed)?;
    product_cache::read::deferred::run(&read).await
}
