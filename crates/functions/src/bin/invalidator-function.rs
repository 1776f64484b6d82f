//! Applies the table's DynamoDB Stream to the cache (event source mapping with
//! `ReportBatchItemFailures`).

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    // Clients are built once per execution environment and reused by every invocation.
    let invalidator = product_cache::invalidator_from_env()
        .await
        .map_err(product_cache::startup_failed)?;
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| async {
        Ok::<_, Error>(invalidator.handle(event.payload).await)
    }))
    .await
}
