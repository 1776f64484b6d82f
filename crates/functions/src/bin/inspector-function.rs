//! The cache inspector on a schedule (EventBridge): compares a sample of cached products with
//! the table and emits `KeysChecked` / `InconsistentKeys`. An invocation may name ids instead,
//! `{"ids": ["kb-001", ...]}`, for an operator's one-off look from the console.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    // Clients are built once per execution environment and reused by every invocation.
    let inspector = product_cache::inspector_from_env()
        .await
        .map_err(product_cache::startup_failed)?;
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| async {
        Ok::<_, Error>(inspector.handle(event.payload).await?)
    }))
    .await
}
