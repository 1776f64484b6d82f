//! The read function as it would be without its fill extension: each miss still answers before
//! its fill, but the fill is merely spawned and nothing holds the invocation open for it. Only
//! for the tests (`tests/it/deferred_fill.rs`) that show what the extension prevents; never
//! deployed.

use lambda_http::Error;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_http::tracing::init_default_subscriber();
    let read = product_cache::read_path_from_env()
        .await
        .map_err(product_cache::startup_failed)?;
    product_cache::read::deferred::run_unguarded(&read).await
}
